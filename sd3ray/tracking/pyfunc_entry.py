"""The file MLflow loads sd3ray's pyfunc model from ("models from code"): the model is built by importing this
code, so loading it unpickles nothing."""

import mlflow.models

from sd3ray.tracking.pyfunc import Sd3rayModel

mlflow.models.set_model(Sd3rayModel())
