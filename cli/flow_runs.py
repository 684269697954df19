"""What a Prefect worker runs for a deployment: the flows, in a process set up as the command line's.

The deployments' entry points name this module (``deployments/deploy.py``), so a flow run on a
worker gets ``bootstrap()`` before TensorFlow loads, as a run from the command line does.
"""

from cli import bootstrap

bootstrap(settings_file=False)  # a deployment's parameters come from the deployment, not a local file

from flows.screen import screen  # noqa: E402
from flows.synthesize import synthesize  # noqa: E402
from flows.train import train  # noqa: E402

__all__ = ["screen", "synthesize", "train"]
