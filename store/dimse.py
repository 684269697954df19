"""Sending DICOM objects to a PACS over DIMSE (C-STORE), for PACS without DICOMweb:
``dimse://AET@HOST:PORT``. The calling AE title is ``CXR_DICOM_CALLING_AET`` (default CXRSCREEN),
which the PACS must know."""

from __future__ import annotations

import contextlib
import io
import os
import re
import socket
from collections.abc import Sequence

from store.backend import LocationError, StorageError

__all__ = ["store_instances"]

TIMEOUT_SECONDS = 30
_DESTINATION = re.compile(r"dimse://([A-Za-z0-9 _.-]{1,16})@([A-Za-z0-9.-]+|\[[0-9a-fA-F:]+\]):([0-9]{1,5})/?")


def _no_delay(association) -> None:
    """TCP_NODELAY on the association's socket: a C-STORE is a few small PDUs each way, and with
    Nagle's algorithm against the peer's delayed ACK every object waited ~40 ms (bench/pacs_bench.py).
    pynetdicom offers no option for it; where its socket is not where this looks, nothing changes."""
    raw = getattr(getattr(getattr(association, "dul", None), "socket", None), "socket", None)
    if isinstance(raw, socket.socket):
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def store_instances(destination: str, objects: Sequence[bytes]) -> None:
    """C-STORE ``objects`` (Part 10 files this code made) in one association; StorageError naming
    the destination and the status when the PACS refuses any."""
    from pydicom import dcmread
    from pydicom.uid import ExplicitVRLittleEndian
    from pynetdicom import AE

    match = _DESTINATION.fullmatch(destination)
    if not match:
        raise LocationError(f"{destination}: a DIMSE destination is dimse://AET@HOST:PORT")
    called, host, port = match.group(1), match.group(2).strip("[]"), int(match.group(3))
    datasets = [dcmread(io.BytesIO(data)) for data in objects]
    ae = AE(ae_title=os.environ.get("CXR_DICOM_CALLING_AET", "CXRSCREEN"))
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = TIMEOUT_SECONDS
    for sop_class in {str(dataset.SOPClassUID) for dataset in datasets}:
        ae.add_requested_context(sop_class, ExplicitVRLittleEndian)
    try:
        association = ae.associate(host, port, ae_title=called)
    except (RuntimeError, ValueError) as error:
        raise StorageError(destination, f"no association: {error}") from None
    if not association.is_established:
        raise StorageError(destination, "the PACS did not accept an association (is CXR_DICOM_CALLING_AET known "
                                        "to it, and the called AE title right?)")
    accepted = {str(context.abstract_syntax) for context in association.accepted_contexts}
    try:
        with contextlib.suppress(OSError):  # a socket the peer reset: the C-STORE says so
            _no_delay(association)
        for dataset in datasets:
            if str(dataset.SOPClassUID) not in accepted:
                raise StorageError(destination, f"the PACS does not take SOP class {dataset.SOPClassUID}")
            try:
                status = association.send_c_store(dataset)
            except (RuntimeError, ValueError) as error:  # the association dropped, or a context went missing
                raise StorageError(destination, f"C-STORE of {dataset.SOPInstanceUID} failed: {error}") from None
            code = getattr(status, "Status", None)
            if code is None or code not in (0x0000, 0xB000, 0xB007, 0xB006):  # success, or stored with a warning
                raise StorageError(destination, f"C-STORE of {dataset.SOPInstanceUID} answered "
                                                f"{'nothing' if code is None else hex(code)}")
    finally:
        association.release()
