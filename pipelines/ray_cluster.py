"""Connect to the Ray cluster a job was submitted to, or start a local one with safe defaults."""
from __future__ import annotations

import os


def init_ray(address: str | None = None, num_cpus: int | None = None, object_store_memory: int | None = None,
             dashboard_host: str = "127.0.0.1", include_dashboard: bool = False, quiet: bool = True):
    """`ray job submit` sets RAY_ADDRESS; with it (or `address`) we join that cluster. Without, a local Ray starts
    in this process. A local dashboard, when asked for, binds to localhost unless `dashboard_host` says otherwise."""
    import ray

    if ray.is_initialized():
        return ray
    address = address or os.environ.get("RAY_ADDRESS")
    # Workers of a local cluster must import this project: ship the working directory's packages only when
    # the driver's packages are not installed site-wide (editable installs are visible to workers already).
    kwargs = {"ignore_reinit_error": True, "log_to_driver": not quiet}
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(num_cpus=num_cpus, object_store_memory=object_store_memory, include_dashboard=include_dashboard,
                 dashboard_host=dashboard_host, **kwargs)
    return ray
