"""Which errors the trainer rewrites as a dead-peer diagnosis (the end-to-end cases, a real rank killed, are
tests/integration/test_resume.py and test_two_node.py)."""

import dataclasses

import pytest
import torch.distributed as dist

from engram_train.checkpoint import CheckpointWriteError
from engram_train.data.manifest import DataError
from engram_train.parallel import ParallelDims, PeerFailureError, explain_peer_failure

RANK_1_OF_2 = ParallelDims(world=2, rank=1, local_rank=1, tp=1, ep=1, table_shards=2, backend="gloo", timeout_s=5)


@pytest.mark.parametrize("error", [
    DataError("data/shards/000.tar: read timed out; check the file system, then relaunch"),
    CheckpointWriteError("checkpoints/step_4: connection to the file server lost; free space, then relaunch"),
])
def test_the_frameworks_own_errors_keep_their_type_and_message(error):
    assert explain_peer_failure(error, RANK_1_OF_2) is error


@pytest.mark.parametrize("error", [
    RuntimeError("[gloo/transport/tcp/pair.cc:534] Connection closed by peer [10.0.0.2]:41234"),
    dist.DistBackendError("Timed out waiting 5000ms for recv operation to complete"),
])
def test_a_backend_error_names_the_rank_that_did_not_report_back(error):
    explained = explain_peer_failure(error, RANK_1_OF_2)
    assert isinstance(explained, PeerFailureError)
    # No store to check in on (the rendezvous host is gone): rank 0, its host, is named.
    assert "rank(s) 0 did not report back" in str(explained) and "parallel.timeout_s=5s" in str(explained)
    assert explain_peer_failure(error, dataclasses.replace(RANK_1_OF_2, world=1)) is error
