__version__ = "0.1.0"
import os

# No telemetry or analytics from anything this package runs, in any process that imports it.
os.environ.setdefault('MLFLOW_DISABLE_TELEMETRY', 'true')
os.environ.setdefault('DVC_NO_ANALYTICS', '1')
os.environ.setdefault('MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR', 'false')  # its bars clutter logs and notebooks
