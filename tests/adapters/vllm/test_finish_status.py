"""Which of vLLM's finish statuses read as "the client got no answer" (a repeat of the prompt is then its retry and
does not share an inferred session, `compat.finished_normally`)."""

import types

import pytest

pytest.importorskip("vllm")

from vllm.v1.request import RequestStatus  # noqa: E402

from kvsched.adapters.vllm import compat  # noqa: E402


def _finished(status):
    return compat.finished_normally(types.SimpleNamespace(status=status))


def test_only_aborted_and_failed_requests_left_the_client_without_an_answer():
    assert not _finished(RequestStatus.FINISHED_ABORTED)
    assert not _finished(RequestStatus.FINISHED_ERROR)
    # a repetition stop and an ignored (too long) prompt still sent the client a reply: a repeat is another ask
    for status in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH_CAPPED,
                   RequestStatus.FINISHED_REPETITION, RequestStatus.FINISHED_IGNORED):
        assert _finished(status), status
    assert compat.finished_normally(types.SimpleNamespace())  # a stand-in without a status
