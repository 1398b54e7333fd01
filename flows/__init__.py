"""Prefect flows: wiring of the stage tasks only."""
