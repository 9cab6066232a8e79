"""call_service: a request lost right after discovery is re-sent; a one-shot one is not."""

from rclpy.task import Future
from sparse_policy_node.ros.services import call_service


class LossyClient:
    """A client whose first ``lost`` requests vanish, as before DDS matching; then answers."""

    def __init__(self, lost: int, available: bool = True):
        self.lost, self.available, self.requests = lost, available, []

    def wait_for_service(self, timeout_sec):
        return self.available

    def call_async(self, request):
        self.requests.append(request)
        future = Future()
        if len(self.requests) > self.lost:
            future.set_result(f'answer to {request}')
        return future


def test_an_unanswered_request_is_re_sent_until_answered():
    client = LossyClient(lost=2)
    assert call_service(client, 'reset', timeout=2.0, resend_s=0.05) == 'answer to reset'
    assert client.requests == ['reset'] * 3


def test_a_one_shot_request_is_sent_once_and_times_out():
    client = LossyClient(lost=1)
    assert call_service(client, 'deactivate', timeout=0.2, resend_s=None) is None
    assert client.requests == ['deactivate']


def test_an_undiscovered_service_gives_none_without_a_request():
    client = LossyClient(lost=0, available=False)
    assert call_service(client, 'reset', timeout=0.1) is None
    assert not client.requests


def test_a_late_answer_to_an_earlier_copy_is_taken():
    class LateClient(LossyClient):

        def call_async(self, request):
            future = super().call_async(request)
            if len(self.requests) == 2:          # the re-sent copy: the first one answers
                self.first.set_result('first answer')
            else:
                self.first = future
            return future

    client = LateClient(lost=5)
    assert call_service(client, 'reset', timeout=2.0, resend_s=0.05) == 'first answer'
