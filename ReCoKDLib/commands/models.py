"""``recokd models [NAME]``: the models at hand (built-in, registry, models folder) and their model cards."""

from __future__ import annotations

import argparse

from ..errors import ReCoKDError


def run(args: argparse.Namespace) -> int:
    from ..deployment.bundle import open_model
    from ..deployment.card import format_card
    from ..deployment.registry import builtin_registry_path, load_registry, resolve_model

    if args.name:
        print(format_card(open_model(resolve_model(args.name, registry=args.registry, progress=True))))
        return 0
    sources = [s for s in (args.registry, builtin_registry_path()) if s]
    if not sources:
        raise ReCoKDError("no registry to list; give --registry FILE")
    for source in sources:
        registry = load_registry(source)
        print(f"# {source}")
        for name in registry.names():
            entry = registry[name]
            print(f"{name}\t{entry.description}")
    print("\n`recokd models NAME` shows a model's card (input it expects, training, accuracy, terms).")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list the models at hand, or show one model's card",
                       description="Without NAME: the built-in models (and those of --registry). With NAME (a "
                       "registry name, a bundle file or folder, or a run folder): its model card, i.e. the input "
                       "it expects (modality, spacing, field of view, intensities), how it was trained, its "
                       "accuracy and how that was measured, and its terms of use.")
    p.add_argument("name", nargs="?", help="model name or bundle path")
    p.add_argument("--registry", help="a registry JSON besides the built-in one")
    p.set_defaults(func=run)
