from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError

from finetune_site.models import ApiKey


class Command(BaseCommand):
    help = "Create an API key for USERNAME and print it as the last line."

    def add_arguments(self, parser):
        parser.add_argument("username")
        parser.add_argument(
            "--create-user", action="store_true", help="Create the user (unusable password) if missing."
        )
        parser.add_argument("--name", default="cli", help="A label for the key.")

    def handle(self, *args, username, create_user, name, **options):
        User = get_user_model()
        user = User.objects.filter(username=username).first()
        if user is None:
            if not create_user:
                raise CommandError(f"No user {username!r}; pass --create-user to create one.")
            user = User(username=username)
            user.set_unusable_password()
            user.save()
            self.stderr.write(f"Created user {username}.")
        _, raw = ApiKey.issue(user, name=name)
        self.stdout.write(raw)
