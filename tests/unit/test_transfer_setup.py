"""What the transfer layer checks before any library moves a byte: RDMA device names, the
failure-injection settings, backend names, a missing library, and the rows handed to write."""

import sys

import numpy as np
import pytest

from meshserve.disagg.transfer import MemoryRegion, TransferError, check_ib_devices, create_backend
from meshserve.disagg.transfer.base import checked_rows, rows_outside
from meshserve.disagg.transfer.env import IB_SYSFS, is_loopback
from meshserve.disagg.transfer.faults import FaultConfig


def test_absent_rdma_device_is_named():
    present = sorted(p.name for p in IB_SYSFS.iterdir()) if IB_SYSFS.is_dir() else []
    check_ib_devices(None)
    check_ib_devices(present)
    with pytest.raises(ValueError, match="no_such_hca0") as e:
        check_ib_devices([*present, "no_such_hca0"])
    assert "present:" in str(e.value)
    with pytest.raises(ValueError, match="no_such_hca0"):
        create_backend("nixl", agent_name="a", host="127.0.0.1", ib_devices=["no_such_hca0"])


def test_unknown_backend_and_bad_fault_settings_are_refused(monkeypatch):
    with pytest.raises(ValueError, match="nixl, mooncake"):
        create_backend("gloo", agent_name="a", host="127.0.0.1")
    monkeypatch.setenv("MESHSERVE_DISAGG_TEST_FAILURE_PROB", "1.5")
    with pytest.raises(ValueError, match="between 0 and 1"):
        create_backend("nixl", agent_name="a", host="127.0.0.1")
    monkeypatch.setenv("MESHSERVE_DISAGG_TEST_FAILURE_PROB", "often")
    with pytest.raises(ValueError, match="not a number"):
        FaultConfig.from_env()
    monkeypatch.setenv("MESHSERVE_DISAGG_TEST_FAILURE_PROB", "0.25")
    monkeypatch.setenv("MESHSERVE_DISAGG_TEST_DELAY_S", "2")
    assert FaultConfig.from_env() == FaultConfig(0.25, 2.0)
    monkeypatch.delenv("MESHSERVE_DISAGG_TEST_FAILURE_PROB")
    monkeypatch.delenv("MESHSERVE_DISAGG_TEST_DELAY_S")
    assert not FaultConfig.from_env().active


@pytest.mark.parametrize("backend, modules, package", [
    ("nixl", ["nixl._api", "nixl_cu13._api", "nixl_cu12._api"], "nixl-cu13"),
    ("mooncake", ["mooncake.engine"], "mooncake-transfer-engine-non-cuda"),
])
def test_missing_library_names_the_pip_package(backend, modules, package, monkeypatch):
    for name in ["NIXL_LOG_LEVEL", "UCX_MODULES", "UCX_NET_DEVICES", "MC_LOG_LEVEL",
                 "MC_TCP_MAX_QUEUED_TRANSFERS_PER_PEER", "MC_TCP_MAX_PENDING_ADMISSIONS_PER_PEER"]:
        monkeypatch.setenv(name, "x")  # restored afterwards: the backends only set these when unset
    for module in modules:
        monkeypatch.setitem(sys.modules, module, None)  # None in sys.modules makes the import fail
    with pytest.raises(TransferError, match=package):
        create_backend(backend, agent_name="a", host="127.0.0.1")


def test_loopback_detection():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("10.0.0.2") and not is_loopback("decode-0.cluster")


def test_rows_are_checked():
    src, dst = checked_rows(np.array([[100, 8], [200, 4]], dtype=np.uint64), np.array([[300, 8], [400, 4]]))
    assert src.dtype == np.int64 and dst.tolist() == [[300, 8], [400, 4]]
    with pytest.raises(ValueError, match="row 1"):
        checked_rows(np.array([[100, 8], [200, 4]]), np.array([[300, 8], [400, 5]]))
    with pytest.raises(ValueError, match="non-empty"):
        checked_rows(np.zeros((0, 2), np.int64), np.zeros((0, 2), np.int64))
    with pytest.raises(ValueError, match="2 rows but dst has 1"):
        checked_rows(np.array([[100, 8], [200, 4]]), np.array([[300, 8]]))


def test_rows_outside_registered_regions():
    regions = [MemoryRegion(1000, 100, "cpu"), MemoryRegion(5000, 50, "cpu")]
    rows = np.array([[1000, 100], [1050, 51], [5010, 40], [900, 10], [2000, 1], [5049, 1]])
    assert rows_outside(rows, regions).tolist() == [1, 3, 4]
