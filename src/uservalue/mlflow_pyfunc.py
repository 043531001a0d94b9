"""The MLflow "model from code" entry: MLflow loads this file instead of unpickling an object.

`uservalue.tracking.log_value_model` logs it with the saved ValueModel directory as the artifact
`model`; see uservalue.tracking.UserValuePyfunc.
"""

import mlflow

from uservalue.tracking import UserValuePyfunc

mlflow.models.set_model(UserValuePyfunc())
