"""The gateway replica relays streams and does routing math: it must not load torch (~200 MB of
resident memory per process, and a second of startup)."""

import subprocess
import sys
import textwrap


def test_the_gateway_module_does_not_import_torch():
    probe = textwrap.dedent(
        """
        import sys
        import slimserve.serve.api.gateway
        from slimserve.serve.config import load_config
        from slimserve.serve.routing.shadow_scores import compare
        heavy = sorted(m for m in ("torch", "transformers", "vllm") if m in sys.modules)
        print(",".join(heavy))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120
    )
    assert result.stdout.strip() == "", f"the gateway imports {result.stdout.strip()}"


def test_building_the_app_does_not_import_transformers():
    """`slimserve serve` builds the Ray Serve app in a process that loads no model: importing
    transformers there cost ~6 s of a 2-core machine's start, while Ray and the replicas start."""
    probe = textwrap.dedent(
        """
        import sys
        import slimserve.serve.app
        print(",".join(sorted(m for m in ("transformers", "vllm") if m in sys.modules)))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120
    )
    assert result.stdout.strip() == "", f"building the app imports {result.stdout.strip()}"
