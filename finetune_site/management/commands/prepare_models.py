from django.conf import settings
from django.core.management.base import BaseCommand

from llm.bundled import BUNDLED_MODEL_ID, TINY_MODEL_ID, build_tiny_model, prepare_bundled_model


class Command(BaseCommand):
    help = "Convert the bundled base model to safetensors and build the tiny model (once)."

    def add_arguments(self, parser):
        parser.add_argument("--tiny-only", action="store_true", help="Skip the bundled SmolLM2 conversion.")

    def handle(self, *args, tiny_only, **options):
        models_dir = settings.FT_MODELS_DIR
        if not tiny_only:
            prepare_bundled_model(models_dir / BUNDLED_MODEL_ID, progress=lambda line: self.stdout.write(line))
        build_tiny_model(
            models_dir / TINY_MODEL_ID, tokenizer_source=None if tiny_only else models_dir / BUNDLED_MODEL_ID
        )
        self.stdout.write(f"Base models ready in {models_dir}")
