"""Running stages: the DVC stage runner and what the Airflow DAGs call."""
