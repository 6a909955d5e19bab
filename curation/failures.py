"""One sample never stops a job; one unit never stops the others.

An exception while processing one sample becomes that sample's rejection: its stage, and a reason naming the
exception, logged once with its traceback (the rejection itself is what the dataset records). An `ImageError` is an
expected verdict on bad data and is recorded without a traceback.

A unit that cannot be processed at all (its archive cannot be listed, its records changed since they were screened)
is a failed unit: the worker writes `work/failed/<unit>.json` with the stage and the reason, the job finishes every
other unit, lists the failed ones at the end and exits non-zero, and a rerun retries only those.
"""
from __future__ import annotations

import json
import logging
import traceback

from common.durable import atomic_write_bytes
from curation.images import ImageError
from curation.sources.base import Rejection

log = logging.getLogger("curation")


def describe(err: BaseException) -> str:
    """`TypeName: message` (first line), the reason recorded for a sample or unit."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


def sample_rejection(stage: str, key: str, err: Exception) -> Rejection:
    """The rejection for a sample whose processing at `stage` raised `err`."""
    if isinstance(err, ImageError):
        return Rejection(stage, str(err))
    log.warning("sample %s rejected at stage %s: %s", key, stage, describe(err),
                exc_info=(type(err), err, err.__traceback__))
    return Rejection(stage, describe(err))


def mark_failed(layout, unit: str, stage: str, err: BaseException) -> dict:
    """Record that `unit` could not be processed at `stage` (durably: the driver reads it after the pass)."""
    record = {"unit": unit, "stage": stage, "reason": describe(err),
              "traceback": "".join(traceback.format_exception(type(err), err, err.__traceback__))}
    log.error("unit %s failed at stage %s: %s\n%s", unit, stage, record["reason"], record["traceback"])
    atomic_write_bytes(layout.failed_marker(unit), json.dumps(record, indent=2).encode())
    return record


def read_failed(layout, unit: str) -> dict | None:
    """The failure recorded for `unit`, or None (an unreadable record still says the unit failed)."""
    path = layout.failed_marker(unit)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        return {"unit": unit, "stage": "unknown", "reason": f"unreadable failure record: {describe(err)}"}


def clear_failed(layout, unit: str) -> None:
    layout.failed_marker(unit).unlink(missing_ok=True)


class IsolatedStage:
    """A model stage (a class called on dict-of-numpy sample batches, e.g. VaeStage) that one sample cannot break.

    A batch whose call raises is retried one sample at a time; a sample that raises on its own is rejected with the
    stage's name and the exception, and passes through the stage as a rejected row (stages pass rejected rows
    through untouched, so it gets the stage's output columns). Batches that work cost nothing extra.
    """

    def __init__(self, stage_cls, stage_name: str, **kwargs):
        self.stage = stage_cls(**kwargs)
        self.name = stage_name

    def __call__(self, batch: dict) -> dict:
        try:
            return self.stage(batch)
        except Exception as err:  # noqa: BLE001 - find the sample that breaks the batch
            if len(batch["key"]) == 1:
                return self.stage(self._rejected(batch, err))
            log.warning("stage %s: a batch of %d raised %s; retrying its samples one by one", self.name,
                        len(batch["key"]), describe(err))
        outs = []
        for i in range(len(batch["key"])):
            one = {name: values[i : i + 1] for name, values in batch.items()}
            try:
                outs.append(self.stage(one))
            except Exception as err:  # noqa: BLE001
                outs.append(self.stage(self._rejected(one, err)))
        return {name: _concat([out[name] for out in outs]) for name in outs[0]}

    def _rejected(self, one: dict, err: Exception) -> dict:
        rejection = sample_rejection(self.name, str(one["key"][0]), err)
        one = dict(one)
        one["reject_stage"] = _object([rejection.stage])
        one["reject_reason"] = _object([rejection.reason])
        return one


def _object(items: list):
    from curation.writer import object_array

    return object_array(items)


def _concat(columns: list):
    import numpy as np

    if any(c.dtype == object for c in columns):
        return _object([item for column in columns for item in column])
    return np.concatenate(columns)


def map_isolated(fn, items: list, stage: str, keys: list[str]) -> list:
    """`fn(items)` (one result per item); when it raises, each item on its own, and an item that raises alone gets
    its `Rejection` (stage, exception) in place of a result. One bad input never fails its batch-mates."""
    try:
        results = list(fn(items))
        if len(results) != len(items):
            raise RuntimeError(f"{stage} returned {len(results)} results for {len(items)} inputs")
        return results
    except Exception as err:  # noqa: BLE001
        if len(items) == 1:
            return [sample_rejection(stage, keys[0], err)]
        log.warning("stage %s: a batch of %d raised %s; retrying its samples one by one", stage, len(items),
                    describe(err))
    return [result for item, key in zip(items, keys) for result in map_isolated(fn, [item], stage, [key])]
