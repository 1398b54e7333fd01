"""prefect-dask's ``DaskTaskRunner``, with LocalCluster workers that report to the flow's Prefect API
(imported only when a profile asks for ``runner.kind: dask``: importing prefect_dask takes seconds)."""

from __future__ import annotations

import os

from prefect_dask import DaskTaskRunner


class SharedApiDaskTaskRunner(DaskTaskRunner):
    """A DaskTaskRunner whose LocalCluster workers report to the flow's Prefect API.

    Worker processes inherit the environment, not Prefect's in-process settings: without
    ``PREFECT_API_URL`` in it (a temporary server, or the test harness) each worker would start a
    temporary server of its own (~20-30 s each here) and its task runs would not show up in the
    flow's UI. The flow's API URL is put in the environment while the cluster starts (an existing
    ``PREFECT_API_URL`` and remote clusters, ``address=``, are left alone).
    """

    @property
    def client(self):
        # prefect-dask creates the cluster on the first access of ``client``
        if self._client or self.address is not None or os.environ.get("PREFECT_API_URL"):
            return super().client
        try:
            from prefect.client.orchestration import get_client

            url = str(get_client(sync_client=True).api_url or "")
        except Exception:  # noqa: BLE001 - fall back to Prefect's default behaviour
            url = ""
        if not url:
            return super().client
        os.environ["PREFECT_API_URL"] = url
        try:
            return super().client
        finally:
            os.environ.pop("PREFECT_API_URL", None)
