"""The one record of the AWS app: how far the per-minute counts have been published to
CloudWatch (`CloudWatchPublication`, a single row, held by a CHECK on its id).

CloudWatch adds up every data point it is sent, so a minute's count sent twice would count
twice in a `Sum` alarm; a minute before `counted_until` has been sent, and is never sent
again."""

from django.db import models
from django.db.models import Q


class CloudWatchPublication(models.Model):
    """Where the counts published to CloudWatch have reached, locked by the publisher for the
    whole of a publication (a second publisher skips)."""

    id = models.PositiveSmallIntegerField(primary_key=True, default=1)
    counted_until = models.DateTimeField(null=True, blank=True)
    published_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        db_table = "aws_cloudwatch_publication"
        constraints = [
            models.CheckConstraint(
                condition=Q(id=1), name="aws_cloudwatch_publication_chk_singleton"
            ),
        ]

    def __str__(self) -> str:
        return f"CloudWatch counts published until {self.counted_until}"
