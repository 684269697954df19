"""The delivery ledger alone (screening/delivery.py), against a destination that does not answer:
a few entries are tried, the rest wait untouched; entries not written by this code are left alone."""

from __future__ import annotations

import json
import socket

from screening import delivery
from store import storage


def pending_entries(results: str, count: int) -> list[str]:
    uids = [f"1.2.3.{number}" for number in range(1, count + 1)]
    for uid in uids:
        storage.write_bytes(storage.join(results, "deliveries", "v1", uid, "report.dcm"), b"DICM")
        storage.write_bytes(storage.join(results, "deliveries", "v1", f"{uid}.json"), json.dumps(
            {"sop_instance_uid": uid, "image_uri": f"dicomweb+http://pacs/dicom-web/studies/1/series/2/instances/{uid}",
             "objects": ["report.dcm"], "destination": "", "status": "pending", "attempts": 0, "nights": 0,
             "last_error": "", "updated_at": ""}).encode())
    return uids


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_a_destination_that_does_not_answer_costs_a_few_entries_not_all(tmp_path):
    results = str(tmp_path)
    pending_entries(results, 6)
    waits = []
    outcome = delivery.deliver(results, f"dicomweb+http://127.0.0.1:{closed_port()}/dicom-web", sleep=waits.append)
    assert outcome.counts == {"delivered": 0, "pending": 6, "dead": 0} and set(outcome.statuses.values()) == {"pending"}
    found = {entry.sop_instance_uid: entry for _, entry in delivery.entries(results)}
    tried = sorted(uid for uid, entry in found.items() if entry.attempts)
    assert len(tried) == delivery.GIVE_UP_AFTER and all(found[uid].attempts == delivery.TRIES for uid in tried)
    assert all(found[uid].nights == 1 and "did not answer" in found[uid].last_error for uid in tried)
    assert waits == [1.0, 4.0] * delivery.GIVE_UP_AFTER  # backoff between the tries of each


def test_entries_this_code_did_not_write_are_left_alone(tmp_path):
    results = str(tmp_path)
    (good,) = pending_entries(results, 1)
    planted = json.loads(storage.read_bytes(storage.join(results, "deliveries", "v1", f"{good}.json")))
    for name, change in (("1.9.1", {"objects": ["../../../etc/passwd"]}), ("1.9.2", {"nights": "3"}),
                         ("1.9.3", {"status": "sent"}), ("1.9.4", {})):  # the last names another instance
        storage.write_bytes(storage.join(results, "deliveries", "v1", f"{name}.json"),
                            json.dumps({**planted, **change, "sop_instance_uid": planted["sop_instance_uid"]
                                        if name == "1.9.4" else name}).encode())
    assert [entry.sop_instance_uid for _, entry in delivery.entries(results)] == [good]


def test_a_destination_that_refuses_the_credentials_is_not_asked_again_in_the_run(tmp_path):
    import http.server
    import threading

    class Refusing(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            self.send_response(403)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *arguments):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Refusing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        results = str(tmp_path)
        (uid,) = pending_entries(results, 1)
        outcome = delivery.deliver(results, f"dicomweb+http://127.0.0.1:{server.server_address[1]}/dicom-web",
                                   max_nights=1, sleep=lambda seconds: None)
    finally:
        server.shutdown()
    (entry,) = [entry for _, entry in delivery.entries(results)]
    assert outcome.counts == {"delivered": 0, "pending": 0, "dead": 1} and entry.sop_instance_uid == uid
    assert entry.attempts == 1 and "refused the credentials (403)" in entry.last_error  # no retry: it would be refused
    (named,) = outcome.dead  # what the run's summary and report name
    assert named["sop_instance_uid"] == uid and named["nights"] == 1 and "403" in named["last_error"]
