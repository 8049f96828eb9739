"""The mcpft Gradio app (what `make run` and a Hugging Face Space start).

    python app.py [--port 7860] [--host 127.0.0.1] [--model FOLDER|HUB_ID|smollm2]

The page is served first; the embedded endpoint then loads its model in the background (the first start converts the
packaged SmolLM2 once, with a progress bar on the console). Settings come from space.yaml (MCPFT_<KEY> overrides).
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="the mcpft app")
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)))
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME"),
                        help="default: 0.0.0.0 on a Hugging Face Space (SPACE_ID set), else 127.0.0.1")
    parser.add_argument("--model", default=None, help="what the embedded endpoint serves (default: space.yaml's "
                                                      "base_model for this machine)")
    args = parser.parse_args(argv)

    from mcpft.space import server_host
    from mcpft.ui import launch, make_context

    ctx = make_context(model=args.model)
    host = server_host(args.host)
    demo, url = launch(ctx, port=args.port, host=host)
    print(f"mcpft is up at {url} (listening on {host or '127.0.0.1'}, data in {ctx.data_dir}); loading the "
          "embedded model in the background",
          file=sys.stderr, flush=True)
    demo.block_thread()


if __name__ == "__main__":
    main()
