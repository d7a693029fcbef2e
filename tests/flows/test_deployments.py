"""`prefect deploy --all` of this repository's prefect.yaml against a real Prefect server, as
README documents it: whatever the deploying shell has set, no deployment carries a tracking URI
or the deployer's project folder, Prefect warns about no placeholder, and a worker's run enters
the project folder of its own machine."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.flows.conftest import prefect

REPO = Path(__file__).resolve().parents[2]
DEPLOYER_URI = "http://tracking.deployer.invalid:5000"
DEPLOYER_FOLDER = "/srv/deployer/fmbseg"
SHELLS = {
    "bare": {},
    "tracking-and-project-set": {
        "MLFLOW_TRACKING_URI": DEPLOYER_URI,
        "FMBSEG_PROJECT_DIR": DEPLOYER_FOLDER,
    },
}
# What a worker's flow-run process does before loading the flow: run the deployment's pull steps.
RUN_PULL_STEPS = """
import asyncio, os, sys
from prefect.client.orchestration import get_client
from prefect.deployments.steps.core import run_steps
with get_client(sync_client=True) as client:
    steps = client.read_deployment_by_name(sys.argv[1]).pull_steps
asyncio.run(run_steps(steps))
print(os.getcwd())
"""

pytestmark = pytest.mark.slow


def deployed(env: dict[str, str]) -> dict[str, object]:
    """``{entrypoint: deployment}`` of every deployment on the server."""
    from prefect.client.orchestration import SyncPrefectClient

    with SyncPrefectClient(env["PREFECT_API_URL"]) as client:
        return {deployment.entrypoint: deployment for deployment in client.read_deployments()}


@pytest.mark.parametrize("shell", SHELLS.values(), ids=SHELLS.keys())
def test_deploy_all_bakes_nothing_of_the_deploying_shell(
    prefect_server: dict[str, str], shell: dict[str, str], tmp_path: Path
) -> None:
    output = prefect("--no-prompt", "deploy", "--all", env=prefect_server | shell, cwd=REPO)
    assert "placeholder" not in output.lower(), output

    config = yaml.safe_load((REPO / "prefect.yaml").read_text())
    found = deployed(prefect_server)
    for declared in config["deployments"]:
        deployment = found[declared["entrypoint"]]
        env = deployment.job_variables.get("env", {})
        assert "MLFLOW_TRACKING_URI" not in env, (deployment.name, env)
        assert deployment.pull_steps == declared.get("pull", config["pull"]), deployment.name
        baked = yaml.safe_dump([deployment.job_variables, deployment.pull_steps])
        assert DEPLOYER_URI not in baked and DEPLOYER_FOLDER not in baked

    worker_folder = tmp_path / "project-on-this-worker"
    worker_folder.mkdir()
    (worker_folder / "dvc.yaml").write_text("stages: {}\n")
    done = subprocess.run(
        [sys.executable, "-c", RUN_PULL_STEPS, "fmbseg-pipeline/gpu"],
        env=prefect_server | {"FMBSEG_PROJECT_DIR": str(worker_folder)},
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == str(worker_folder)
