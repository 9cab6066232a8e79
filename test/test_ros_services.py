"""call_service: a request lost right after discovery is re-sent; a one-shot one is not.

Each call is measured, and a call that stalls keeps what its ``diagnose`` saw then. The
test harness keeps each run in a DDS domain no other process on the host uses, so no other
run's ``policy_node`` answers (or hides) a service.
"""

import os
import socket

from rclpy.node import Node
from rclpy.task import Future
from sparse_policy_node.ros import services
from sparse_policy_node.ros.services import CALL_LOG
from sparse_policy_node.ros.services import call_service
from sparse_policy_node.ros.testing import domain_in_use
from sparse_policy_node.ros.testing import FakeRobot
from sparse_policy_node.ros.testing import isolate_ros
from sparse_policy_node.ros.testing import service_graph
from sparse_policy_node.ros.testing import Spinner
from std_srvs.srv import Trigger


class LossyClient:
    """A client whose first ``lost`` requests vanish, as before DDS matching; then answers."""

    srv_name = '/fake_lossy_service'  # kept apart from real calls in the end-of-run block

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


def test_a_re_sent_request_goes_out_when_the_graph_says_the_service_is_missing():
    # rmw can judge a present service unavailable (a half-removed participant's endpoint
    # skews its count): after a second's wait an idempotent request is sent anyway.
    client = LossyClient(lost=1, available=False)
    assert call_service(client, 'probe', timeout=3.0, resend_s=0.05) == 'answer to probe'
    assert client.requests == ['probe'] * 2
    assert CALL_LOG[-1].stall['at'] == 'discovery'   # measured as a stall
    once = LossyClient(lost=0, available=False)  # a one-shot request still needs the graph
    assert call_service(once, 'deactivate', timeout=1.5, resend_s=None) is None
    assert not once.requests
    # ... unless its probe was answered on the same client (both directions matched).
    assert call_service(once, 'deactivate', timeout=1.5, resend_s=None,
                        matched=True) == 'answer to deactivate'
    assert once.requests == ['deactivate']


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


def test_each_call_is_recorded_with_its_sends_and_answer_time():
    call_service(LossyClient(lost=2), 'reset', timeout=2.0, resend_s=0.05)
    record = CALL_LOG[-1]
    assert record.service == '/fake_lossy_service' and record.timeout == 2.0
    assert record.sends == 3 and record.answered_copy == 3
    assert 0.1 <= record.answer_s < 2.0 and record.discovery_s >= 0.0
    call_service(LossyClient(lost=1), 'deactivate', timeout=0.2, resend_s=None)
    record = CALL_LOG[-1].as_dict()
    assert record['sends'] == 1 and record['answer_s'] is None and record['resend_s'] is None
    call_service(LossyClient(lost=0, available=False), 'reset', timeout=0.1)
    assert CALL_LOG[-1].sends == 0 and CALL_LOG[-1].answer_s is None


def test_a_stalled_call_keeps_what_diagnose_saw_then(monkeypatch):
    monkeypatch.setattr(services, 'STALL_S', 0.0)
    call_service(LossyClient(lost=0, available=False), 'reset', timeout=0.1,
                 diagnose=lambda: {'servers': 0})
    assert CALL_LOG[-1].stall == {'at': 'discovery', 'servers': 0}
    call_service(LossyClient(lost=1), 'reset', timeout=2.0, resend_s=0.05,
                 diagnose=lambda: 1 / 0)                 # a failing diagnosis: noted, no more
    assert CALL_LOG[-1].sends == 2 and CALL_LOG[-1].stall['at'] == 'answer'
    assert 'ZeroDivisionError' in CALL_LOG[-1].stall['error']
    call_service(LossyClient(lost=0), 'reset', timeout=2.0, diagnose=lambda: 1 / 0)
    assert CALL_LOG[-1].stall is None and CALL_LOG[-1].answered_copy == 1


def test_service_graph_names_the_endpoints_of_server_and_client(context):
    server = Node('server', context=context)
    name = f'graph_probe_{os.getpid()}/reset'
    server.create_service(Trigger, name, lambda request, response: response)
    robot = FakeRobot(context=context)
    try:
        with Spinner(context, server, robot):
            assert robot.call(Trigger, name, Trigger.Request()) is not None
            graph = service_graph(robot, name)
    finally:
        server.destroy_node()
        robot.destroy_node()
    assert [e.split('@')[0] for e in graph['request_readers']] == ['/server'], graph
    assert [e.split('@')[0] for e in graph['response_writers']] == ['/server'], graph
    assert [e.split('@')[0] for e in graph['request_writers']] == ['/fake_robot'], graph
    assert [e.split('@')[0] for e in graph['response_readers']] == ['/fake_robot'], graph
    assert graph['request_readers'][0].split('@')[1] == graph['request_writers'][0].split('@')[1]


def test_isolate_ros_skips_a_domain_another_participant_holds(monkeypatch, tmp_path):
    monkeypatch.delenv('ROS_DOMAIN_ID', raising=False)
    monkeypatch.setenv('ROS_LOG_DIR', '')                 # restored after the test
    first = 1 + os.getpid() % 200
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as held:
        if not domain_in_use(first):
            held.bind(('0.0.0.0', 7410 + 250 * first))    # participant 0's discovery port
        assert domain_in_use(first)
        isolate_ros(str(tmp_path))
        domain = int(os.environ['ROS_DOMAIN_ID'])
    assert domain != first and 1 <= domain <= 200 and not domain_in_use(domain)
    assert os.environ['ROS_LOG_DIR'] == str(tmp_path)
    monkeypatch.setenv('ROS_DOMAIN_ID', '7')              # a domain given is kept
    isolate_ros(str(tmp_path))
    assert os.environ['ROS_DOMAIN_ID'] == '7'
