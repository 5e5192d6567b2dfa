"""moto's server (the SQS-compatible one the tests use) with receives and deletes made atomic.

moto checks that a message is visible and then marks it received without a lock, so two
concurrent ReceiveMessage calls can both get the same message, which real SQS never does
within a visibility timeout. Here each receive takes its messages under one lock and does
its long-poll waiting outside it.

moto's DeleteMessage rebuilds the queue's message list and assigns it back, without the lock
SendMessage appends under: a message sent while a delete rebuilds, or while another delete's
list replaces the one it was appended to, is gone, and its job waits for ever (the 200-job SQS
test once ended with 4 jobs queued). Here deletes take that lock, and the receives' one.
Arguments are moto_server's (-H HOST -p PORT).
"""

import threading
import time

from moto.server import main
from moto.sqs.models import Queue, SQSBackend

_receive = SQSBackend.receive_message
_lock = threading.Lock()


def receive_message(self, queue_name, count, wait_seconds_timeout, visibility_timeout,
                    message_attribute_names=None):
    deadline = time.time() + (wait_seconds_timeout or 0)
    while True:
        with _lock:
            result = _receive(self, queue_name, count, 0, visibility_timeout,
                              message_attribute_names)
        if result or time.time() >= deadline:
            return result
        # Wakes when a message arrives (or after at most 0.2 s, for delayed ones).
        self.get_queue(queue_name).wait_for_messages(0.2)


SQSBackend.receive_message = receive_message

_delete = Queue.delete_message


def delete_message(self, receipt_handle):
    # The receives' lock first, as a receive that dead-letters takes the queue's after it.
    with _lock, self._messages_lock:
        _delete(self, receipt_handle)


Queue.delete_message = delete_message

if __name__ == "__main__":
    main()
