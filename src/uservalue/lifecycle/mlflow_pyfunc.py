"""The MLflow "model from code" entry: MLflow loads this file instead of unpickling an object.

`uservalue.lifecycle.tracking.log_value_model` logs it with the saved ValueModel directory as the artifact
`model`; see uservalue.lifecycle.tracking.UserValuePyfunc.
"""

import mlflow

from uservalue.lifecycle.tracking import UserValuePyfunc

mlflow.models.set_model(UserValuePyfunc())
