"""The package layout promises: kiln is importable, `platform` is the stdlib, kiln has no ray."""

import subprocess
import sys

from conftest import REPO


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)


def test_platform_is_the_standard_library_module():
    done = _python("import platform, sysconfig; print(platform.__file__); print(platform.system())")
    assert done.returncode == 0, done.stderr
    path = done.stdout.splitlines()[0]
    assert "/platform/" not in path.replace(str(REPO), "") and path.endswith("platform.py")


def test_kiln_core_imports_without_ray_or_deepspeed():
    done = _python(
        "import sys, kiln, kiln.config, kiln.dpo, kiln.dpo.data, kiln.dpo.plots, kiln.lm, "
        "kiln.engine, kiln.snn, kiln.tracking, kiln.worlds.text, kiln.worlds.tokenizer, "
        "kiln.worlds.shapes, kiln.diffusion.base, kiln.diffusion.evaluate\n"
        "bad = [m for m in ('ray', 'deepspeed') if m in sys.modules]\n"
        "assert not bad, bad"
    )
    assert done.returncode == 0, done.stderr
    sources = "\n".join(p.read_text() for p in (REPO / "platform" / "kiln").rglob("*.py"))
    assert "import ray" not in sources and "from ray" not in sources


def test_submitted_working_dir_finds_kiln_without_an_install():
    # What `ray job submit --working-dir .` gives a job: the repo root on sys.path, nothing else.
    done = subprocess.run(
        [sys.executable, "-S", "-c", "import sys; sys.path.insert(0, '.'); import jobs, kiln; "
         "print(kiln.__file__)"],
        capture_output=True, text=True, cwd=REPO,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(REPO / "platform" / "kiln" / "__init__.py")


def test_engine_imports_with_torch_and_transformers_alone():
    """The GPU machines have torch, transformers and triton only: no pydantic, ray or deepspeed."""
    done = _python(
        "import sys\n"
        "for name in ('pydantic', 'ray', 'deepspeed', 'diffusers', 'peft'):\n"
        "    sys.modules[name] = None  # importing any of them now raises ImportError\n"
        "import kiln.engine, kiln.engine.spec_decode, kiln.engine.smartspec"
    )
    assert done.returncode == 0, done.stderr


def test_gp_imports_without_diffusers():
    """kiln.gp takes kiln's pixel convention from kiln.pixels, not from the diffusion base."""
    done = _python(
        "import sys\n"
        "for name in ('ray', 'deepspeed', 'diffusers', 'peft'):\n"
        "    sys.modules[name] = None\n"
        "import kiln.pixels, kiln.gp"
    )
    assert done.returncode == 0, done.stderr
