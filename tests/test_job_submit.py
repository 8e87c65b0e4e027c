"""`ray job submit --working-dir .` to a real head with token authentication on."""

import json
import time
import urllib.error
import urllib.request

from ray.job_submission import JobStatus, JobSubmissionClient

from conftest import REPO, SMALL


def test_submitted_job_succeeds_and_writes_its_artifacts(ray_cluster, tmp_path):
    client = JobSubmissionClient(ray_cluster.dashboard_url)
    overrides = " ".join(f"--set {item}" for item in [*SMALL, "runner.max_steps=3"])
    job_id = client.submit_job(
        entrypoint=f"python -m jobs.pretrain_lm {overrides} --output {tmp_path / 'run'}",
        runtime_env={"working_dir": str(REPO), "excludes": [".venv", "runs", ".git"]},
    )
    deadline = time.monotonic() + 480
    while not (status := client.get_job_status(job_id)).is_terminal():
        assert time.monotonic() < deadline, "job did not finish in time"
        time.sleep(2)
    assert status == JobStatus.SUCCEEDED, client.get_job_logs(job_id)[-4000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 3
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()


def test_dashboard_refuses_requests_without_the_token(ray_cluster):
    request = urllib.request.Request(f"{ray_cluster.dashboard_url}/api/jobs/")
    try:
        urllib.request.urlopen(request, timeout=10)
        status = 200
    except urllib.error.HTTPError as error:
        status = error.code
    assert status in (401, 403)
    authorised = urllib.request.Request(
        f"{ray_cluster.dashboard_url}/api/jobs/",
        headers={"Authorization": f"Bearer {ray_cluster.token}"},
    )
    with urllib.request.urlopen(authorised, timeout=10) as response:
        assert response.status == 200
