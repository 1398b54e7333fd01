"""The latent browser (pure code, no Prefect): every SAE's latents as pages of a static site.

- :mod:`.stream`: the streaming pass over an activation store (:func:`scan`), the lower-quantile
  samples, the token windows with per-token activations (:func:`context_windows`) and the logit
  effects (:func:`logit_effects`), the ``browser`` artifact's files (:func:`save_browser_data`); memory is bounded by ``width x n_top``, not by the store.
- :mod:`.facts`: what the evaluations found about each latent (absorption, stitching, meta-SAE).
- :mod:`.site`: the static site (``results/<profile>/browser/``).

docs/browser.md describes what the pages show and what the stage costs.
"""

from saeflow.browser.facts import Fact, FactSources, join
from saeflow.browser.site import SiteSAE, gc_paused, site_size, write_site
from saeflow.browser.stream import (
    DATA_FILE,
    TOKENS_FILE,
    BrowserInputError,
    LatentStats,
    RunningTop,
    Windows,
    context_windows,
    logit_effects,
    lower_quantile_rows,
    save_browser_data,
    scan,
)

__all__ = ["DATA_FILE", "TOKENS_FILE", "BrowserInputError", "Fact", "FactSources", "LatentStats", "RunningTop", "SiteSAE", "Windows",
           "context_windows", "gc_paused", "join", "logit_effects", "lower_quantile_rows", "save_browser_data", "scan",
           "site_size", "write_site"]
