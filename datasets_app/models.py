from functools import partial

from django.conf import settings
from django.db import models
from django.utils import timezone

from finetune_site.ids import new_id


class DatasetQuerySet(models.QuerySet):
    def owned_by(self, user):
        return self.filter(owner=user)


class Dataset(models.Model):
    """An uploaded JSONL file, validated in the background (the API's `file`)."""

    UPLOADED = "uploaded"
    PROCESSED = "processed"
    ERROR = "error"
    STATUS_CHOICES = [(UPLOADED, "validating"), (PROCESSED, "ready"), (ERROR, "error")]

    public_id = models.CharField(max_length=40, unique=True, default=partial(new_id, "file"))
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="datasets")
    filename = models.CharField(max_length=255)
    purpose = models.CharField(max_length=32, default="fine-tune")
    file = models.FileField(upload_to="datasets/%Y/%m/", max_length=300)
    normalized = models.FileField(upload_to="datasets/normalized/", max_length=300, blank=True)
    bytes = models.BigIntegerField(default=0)
    status = models.CharField(max_length=16, choices=STATUS_CHOICES, default=UPLOADED)
    status_details = models.TextField(blank=True)
    format = models.CharField(max_length=32, blank=True)
    examples = models.IntegerField(null=True, blank=True)
    report = models.JSONField(null=True, blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    processed_at = models.DateTimeField(null=True, blank=True)
    origin = models.JSONField(
        null=True,
        blank=True,
        help_text="How a split or deduplicated file is made from its source; a worker writes it while status is "
        "uploaded and the file is still empty.",
    )
    enqueued_at = models.DateTimeField(
        default=timezone.now, help_text="When its last background task was queued; the reconciliation reads it."
    )

    objects = DatasetQuerySet.as_manager()

    class Meta:
        ordering = ["-id"]

    def __str__(self):
        return f"{self.filename} ({self.public_id})"

    @property
    def is_ready(self) -> bool:
        return self.status == self.PROCESSED

    @property
    def is_being_written(self) -> bool:
        """A split or deduplicated file whose lines a worker has not written yet."""
        return self.status == self.UPLOADED and not self.file

    def mark_processed(self, *, examples: int, fmt: str, report: dict, details: str = "") -> bool:
        """Record a valid file (with its normalized copy); False when it was deleted or finished meanwhile."""
        return self._update_row(
            status=self.PROCESSED,
            examples=examples,
            format=fmt,
            report=report,
            status_details=details,
            normalized=self.normalized,
            processed_at=timezone.now(),
        )

    def mark_error(self, details: str, *, report: dict | None = None) -> bool:
        """Record an invalid file; False when it was deleted or finished meanwhile."""
        return self._update_row(status=self.ERROR, status_details=details, report=report, processed_at=timezone.now())

    def _update_row(self, **fields) -> bool:
        """Leave the uploaded state with an UPDATE only; False when the row is gone or has left it already.

        A file can be deleted while it is being validated; save() would then find
        no row to update and INSERT it again, bringing the deleted dataset back. A
        validation that runs twice (re-queued after a lost task) records once.
        """
        for name, value in fields.items():
            setattr(self, name, value)
        return type(self).objects.filter(pk=self.pk, status=self.UPLOADED).update(**fields) == 1
