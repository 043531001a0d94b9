"""The MLflow "model from code" entry (no pickles): logged by tracking.log_value_model with the saved
ValueModel as the artifact `model`."""

import mlflow

from uservalue.lifecycle.tracking import UserValuePyfunc

mlflow.models.set_model(UserValuePyfunc())
