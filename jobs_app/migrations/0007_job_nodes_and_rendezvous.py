from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('jobs_app', '0006_job_processes'),
    ]

    operations = [
        migrations.AddField(
            model_name='finetuningjob',
            name='nodes',
            field=models.PositiveSmallIntegerField(default=1),
        ),
        migrations.AddField(
            model_name='finetuningjob',
            name='rendezvous',
            field=models.CharField(blank=True, max_length=260),
        ),
    ]
