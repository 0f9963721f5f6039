from .models import Dataset


def datasets_for(user):
    return Dataset.objects.owned_by(user)


def dataset_for(user, public_id: str) -> Dataset | None:
    return datasets_for(user).filter(public_id=public_id).first()


def ready_datasets_for(user):
    return datasets_for(user).filter(status=Dataset.PROCESSED, purpose="fine-tune")
