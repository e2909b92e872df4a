"""What reaches the training console from Ray Train and torch, checked against the filters that decide it."""

import logging

import pytest

from sd3ray.training.step import no_cuda_notice


def _record(level: int, message: str, with_traceback: bool = False) -> logging.LogRecord:
    exc_info = (RuntimeError, RuntimeError("GetTimeoutError"), None) if with_traceback else None
    return logging.LogRecord("ray.train.v2", level, __file__, 1, message, None, exc_info)


def test_ray_trains_console_keeps_errors_and_drops_its_warnings_with_tracebacks() -> None:
    """Ray Train's console handler filters by the LoggingConfig level sd3ray gives it (its files keep all)."""
    logging_module = pytest.importorskip("ray.train.v2._internal.logging.logging")
    from sd3ray.cluster.trainer import quiet_train_logs

    console = logging_module.TrainLogLevelFilter(quiet_train_logs()["logging_config"].log_level)
    assert not console.filter(_record(logging.WARNING, "Failed to send resource request for ...", True))
    assert not console.filter(_record(logging.INFO, "Attempting to start training worker group of size 1"))
    assert console.filter(_record(logging.ERROR, "Training failed"))


def test_only_torchs_no_cuda_notice_is_dropped() -> None:
    assert not no_cuda_notice(_record(logging.WARNING, "No CUDA runtime is found, using CUDA_HOME='/usr/local'"))
    assert no_cuda_notice(_record(logging.WARNING, "Error building extension 'x'"))
