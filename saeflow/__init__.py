"""saeflow: the domain library (models, SAEs, activation store, training, evaluations). It never imports Prefect."""
