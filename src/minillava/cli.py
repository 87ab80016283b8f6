"""The ``minillava`` command: generate, chat, info, serve, train, convert.

    minillava generate --model DIR --image cat.jpg --prompt "What is in this image?"
    minillava chat --model DIR [--image cat.jpg]
    minillava info --model DIR
    minillava serve --model DIR [--port 8000]    (OpenAI-compatible API and a chat page; the serve extra)
    minillava train ...            (see minillava train --help)
    minillava convert SRC DST      (python -m weights_convert; see minillava convert --help)

``--model`` takes a converted directory, an unconverted llava-hf or original LLaVA one, or a hub id. torch is
imported only by the commands that run a model, so ``--help`` answers at once. Errors are one line on stderr and
a non-zero exit status.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from .chat import TEMPLATES
from .config import BUNDLED_MODEL, DTYPE_NAMES
from .device import DEVICE_CHOICES

CHAT_HELP = """\
Commands inside the chat:
  /image PATH   attach an image to your next message (a second /image before you send replaces it)
  /reset        start a new conversation
  /quit         leave (Ctrl-D works too)
Images stay in the conversation; LLaVA-1.5 models were trained with one image per conversation, so /reset
before asking about a new one. Arrow keys edit the line and recall earlier ones.
Ctrl-C stops the answer being generated, not the program."""


class CliError(Exception):
    """An error to report as one line, without a traceback."""


def _model_dir(value: str | None) -> str | Path:
    if value is not None:
        return value
    if (BUNDLED_MODEL / "config.json").is_file():
        return BUNDLED_MODEL
    raise CliError("no --model given and no bundled model found")


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as package_version

    try:
        return package_version("minillava")
    except PackageNotFoundError:
        return "unknown (not installed)"


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        metavar="DIR",
        help="a checkpoint directory (converted, or an unconverted llava-hf or original LLaVA one) or a Hugging Face "
        "hub id such as llava-hf/llava-1.5-7b-hf; default: the bundled shapes model, if installed",
    )


def _add_generation_args(p: argparse.ArgumentParser) -> None:
    _add_model_args(p)
    p.add_argument(
        "--template",
        metavar="NAME",
        help=f"chat template, one of {', '.join(TEMPLATES)} (default: the checkpoint's, see 'info')",
    )
    p.add_argument("--system", metavar="TEXT", help="system prompt replacing the template's")
    p.add_argument(
        "--max-new-tokens",
        type=_positive_int,
        metavar="N",
        help="the most tokens to generate (default: the checkpoint's, else 512; at most what the context window "
        "has left)",
    )
    p.add_argument("--temperature", type=float, metavar="T", help="0 = greedy (the default); > 0 samples")
    p.add_argument("--top-p", type=float, metavar="P", help="nucleus sampling: keep tokens up to probability P")
    p.add_argument("--top-k", type=int, metavar="K", help="sample among the K most likely tokens only")
    p.add_argument("--seed", type=int, metavar="S", help="seed for sampling (same seed, same answer)")
    p.add_argument(
        "--compile",
        action="store_true",
        help="decode through a torch.compile'd step: compiling takes a while once, then each token is faster",
    )
    _add_runtime_args(p)


def _add_runtime_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--dtype", choices=sorted(DTYPE_NAMES), help="weights' dtype (default: as stored; bfloat16 halves fp32 memory)"
    )
    p.add_argument(
        "--quantize",
        choices=("int8", "int4"),
        help="quantise the decoder's linear layers while loading: int8 halves bf16 weight bytes, int4 quarters them",
    )
    p.add_argument(
        "--device",
        default="auto",
        metavar="DEV",
        help=f"where the model runs: {', '.join(DEVICE_CHOICES)} or cuda:N (default: auto, a CUDA GPU when there "
        "is one, else the CPU)",
    )
    p.add_argument(
        "--threads", type=_positive_int, metavar="N", help="torch intra-op threads (default: torch's, one per core)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="minillava",
        description="minillava: a small, exact and fast pure-PyTorch LLaVA.",
        epilog="Run 'minillava COMMAND --help' for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"minillava {version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    gen = sub.add_parser(
        "generate",
        help="answer one prompt about images, printing the answer as it is generated",
        description="Answer one prompt about zero or more images; the answer is printed as it is generated.",
    )
    gen.add_argument("--image", action="append", default=[], metavar="PATH", help="an image (repeat for several)")
    gen.add_argument(
        "--prompt",
        required=True,
        metavar="TEXT",
        help="the question; <image> marks where images go, else each image is put before the text",
    )
    _add_generation_args(gen)

    chat = sub.add_parser(
        "chat",
        help="an interactive conversation",
        description="An interactive conversation about images.",
        epilog=CHAT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    chat.add_argument(
        "--image", action="append", default=[], metavar="PATH", help="an image for the first message (repeatable)"
    )
    _add_generation_args(chat)

    info = sub.add_parser(
        "info",
        help="describe a checkpoint",
        description="Describe a checkpoint: layout, parameter counts per part, dtype, context length, image size "
        "and tokens per image, chat template. Reads config.json and the safetensors headers only.",
    )
    _add_model_args(info)
    info.add_argument("--json", action="store_true", help="print the description as JSON")

    serve = sub.add_parser(
        "serve",
        help="an OpenAI-compatible HTTP server with continuous batching, and a chat page",
        description="Serve the model over HTTP: POST /v1/chat/completions (OpenAI's schema, streaming), GET "
        "/v1/models, GET /health, and a chat page at /. Requests are decoded together in --slots rows of one KV "
        "cache. Needs the serve extra: pip install 'minillava[serve]'.",
    )
    _add_model_args(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine)")
    serve.add_argument("--port", type=_port, default=8000, help="port to listen on (default: 8000; 0: any free port)")
    serve.add_argument(
        "--slots", type=_positive_int, default=8, metavar="N", help="requests decoded together (default: 8)"
    )
    serve.add_argument(
        "--allow-remote-images",
        action="store_true",
        help="fetch http(s) image URLs (off by default: images come inline as data: URLs; local files never)",
    )
    _add_runtime_args(serve)

    sub.add_parser(
        "train",
        help="train or fine-tune (see 'minillava train --help')",
        description="Forwarded to minillava.train; run 'minillava train --help' for its options.",
        add_help=False,
    )
    sub.add_parser(
        "convert",
        help="convert a checkpoint to the minillava layout, or export one to llava-hf (see 'minillava convert --help')",
        description="The same as python -m weights_convert; run 'minillava convert --help' for its options.",
        add_help=False,
    )
    return parser


def _pipeline(args: argparse.Namespace):
    import torch

    from .checkpoint import weights_bytes
    from .device import resolve_device
    from .hub import resolve
    from .pipeline import Pipeline
    from .progress import human_bytes, notice_if_slow

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    path = resolve(_model_dir(args.model))  # a hub id may download here, with the hub client's progress bars
    size = human_bytes(weights_bytes(path)) if path.is_dir() else "?"
    message = f"loading {path} ({size}{f' as {args.dtype}' if args.dtype else ''}) on {device}..."
    with notice_if_slow(message):
        return Pipeline(
            path, dtype=args.dtype, device=device, template=args.template, compile=args.compile, quantize=args.quantize
        )


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 0..65535, got {value}")
    return value


def _gen_kwargs(args: argparse.Namespace) -> dict:
    return dict(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
    )


def _check_images(paths: Sequence[str]) -> None:
    for path in paths:
        if not Path(path).is_file():
            raise CliError(f"{path}: no such image file")


def cmd_generate(args: argparse.Namespace) -> int:
    _check_images(args.image)
    pipe = _pipeline(args)
    pieces = pipe.stream(args.prompt, args.image, system=args.system, **_gen_kwargs(args))
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    _check_images(args.image)
    if hasattr(sys.stdin, "reconfigure"):
        # A line that is not UTF-8 reaches the tokenizer, which refuses it by name, instead of ending the chat.
        sys.stdin.reconfigure(errors="surrogateescape")
    try:
        import readline  # noqa: F401  (input() then edits lines and recalls earlier ones with the arrow keys)
    except ImportError:  # not on every platform
        pass
    pipe = _pipeline(args)
    conv = pipe.conversation(system=args.system)
    pending: list[str] = list(args.image)
    gen = _gen_kwargs(args)
    print(f"minillava chat ({pipe.path}, template {pipe.template.name}). /quit or Ctrl-D to leave, /help for commands.")
    print("/image PATH attaches an image to your next message; images stay in the conversation until /reset.")
    while True:
        try:
            line = input("USER: ")
        except EOFError:
            print()
            return 0
        except KeyboardInterrupt:
            print("\n(Ctrl-C stops an answer; /quit or Ctrl-D leaves)")
            continue
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            command, _, rest = text.partition(" ")
            if command in ("/quit", "/exit"):
                return 0
            if command == "/reset":
                conv.reset()
                pending = []
                print("(new conversation)")
            elif command == "/image":
                path = rest.strip()
                if not path:
                    print("usage: /image PATH")
                elif not Path(path).is_file():
                    print(f"{path}: no such image file")
                else:
                    print(_attach_message(path, pending, len(conv.pixels)))
                    pending = [path]
            elif command == "/help":
                print(CHAT_HELP)
            else:
                print(f"unknown command {command}; /help lists them")
            continue
        try:
            pieces = conv.stream(text, pending, **gen)
        except (ValueError, OSError) as err:
            dropped = f" ({len(pending)} attached image(s) dropped; /image to attach again)" if pending else ""
            print(f"error: {_one_line(err)}{dropped}")
            pending = []
            continue
        pending = []
        sys.stdout.write("ASSISTANT: ")
        sys.stdout.flush()
        try:
            for piece in pieces:
                sys.stdout.write(piece)
                sys.stdout.flush()
        except KeyboardInterrupt:
            pieces.close()
            sys.stdout.write(" [stopped]")
        except ValueError as err:
            sys.stdout.write(f"\nerror: {_one_line(err)}")
        sys.stdout.write("\n")
        sys.stdout.flush()


def _quantization(info: dict | None) -> str:
    if not info:
        return "no"
    if info["scheme"] == "int4":
        return f"int4 decoder linear layers (groups of {info['group']} columns), int8 lm_head"
    return f"{info['scheme']} decoder linear layers and lm_head (one scale per row)"


def _attach_message(path: str, pending: list[str], in_conversation: int) -> str:
    """What attaching ``path`` does, said on screen: it replaces an image not sent yet, and joins the images the
    conversation already has (which LLaVA-1.5 models were not trained for)."""
    if pending:
        text = f"(image {path} replaces {', '.join(pending)} for your next message)"
    else:
        text = f"(image {path} will go with your next message)"
    if in_conversation:
        text += (
            f"\n(the conversation already has {in_conversation} image(s) and keeps them; LLaVA-1.5 models were "
            "trained with one image per conversation: /reset first to ask about this one alone)"
        )
    return text


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from . import serve
    except ModuleNotFoundError as err:
        if err.name not in ("fastapi", "starlette", "uvicorn"):
            raise
        raise CliError(
            f"minillava serve needs the serve extra ({err.name} is missing): pip install 'minillava[serve]'"
        ) from None
    import torch

    from .device import resolve_device

    device = resolve_device(args.device)  # before loading: a missing GPU is said at once
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        serve.run(
            _model_dir(args.model),
            host=args.host,
            port=args.port,
            slots=args.slots,
            device=device,
            dtype=args.dtype,
            quantize=args.quantize,
            allow_remote_images=args.allow_remote_images,
        )
    except KeyboardInterrupt:
        pass  # Ctrl-C is how a server stops: uvicorn has shut down cleanly, then passed the signal on
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from .checkpoint import describe_checkpoint

    info = describe_checkpoint(_model_dir(args.model))
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    params = info["parameters"]
    rows = [
        ("checkpoint", info["path"]),
        ("layout", info["layout"]),
        ("dtype", info["dtype"]),
        ("quantized", _quantization(info["quantization"])),
        ("parameters", f"{params['total']:,} total"),
        *((f"  {part}", f"{n:,}") for part, n in params.items() if part != "total"),
        ("decoder", info["decoder"]),
        ("vision", info["vision"]),
        ("context length", f"{info['context_length']} tokens"),
        (
            "image",
            f"{info['image_size']}x{info['image_size']} px ({info['image_mode']}), "
            f"{info['tokens_per_image']} tokens per {'tile' if info['anyres'] else 'image'} "
            f"(id {info['image_token_id']})",
        ),
        *_anyres_rows(info["anyres"]),
        ("template", info["template"]),
        ("eos id", str(info["eos_token_id"])),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0


def _anyres_rows(anyres: dict | None) -> list[tuple[str, str]]:
    if anyres is None:
        return []
    canvases = ", ".join(f"{h}x{w}" for h, w in anyres["grid_pinpoints"])
    cap = anyres["max_sequence_length"]
    return [
        ("tiles", f"LLaVA-1.6 anyres: canvases (height x width) {canvases}; merge {anyres['merge']}"),
        ("rules", f"unpad rounding {anyres['unpad_rounding']}; sequence cap {cap if cap else 'none'}"),
    ]


def _one_line(err: BaseException) -> str:
    text = str(err) or type(err).__name__
    if isinstance(err, KeyError):
        text = text.strip("'\"")
    return " ".join(text.split())


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] == "train":
            from .train import main as train_main  # lazy: training pulls in more than inference needs

            return train_main(argv[1:])
        if argv and argv[0] == "convert":
            from weights_convert.__main__ import main as convert_main

            return convert_main(argv[1:], prog="minillava convert")
        args = build_parser().parse_args(argv)
        commands = {"generate": cmd_generate, "chat": cmd_chat, "info": cmd_info, "serve": cmd_serve}
        return commands[args.command](args)
    except KeyboardInterrupt:  # torch and the model load inside the commands: Ctrl-C then is one line too
        print("\ninterrupted", file=sys.stderr)
        return 130
    except (CliError, ValueError, OSError, KeyError, ImportError) as err:
        print(f"minillava {argv[0]}: error: {_one_line(err)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
