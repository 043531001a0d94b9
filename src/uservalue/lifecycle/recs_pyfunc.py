"""The MLflow "model from code" entry of the recommender (no pickles): logged by
train_recs.log_recommender with the saved Recommender as the artifact `model`."""

import mlflow

from uservalue.lifecycle.train_recs import RecommenderPyfunc

mlflow.models.set_model(RecommenderPyfunc())
