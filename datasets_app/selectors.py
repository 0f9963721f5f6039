from .models import Dataset


def datasets_for(user):
    return Dataset.objects.owned_by(user)


def dataset_for(user, public_id: str) -> Dataset | None:
    return datasets_for(user).filter(public_id=public_id).first()


def ready_datasets_for(user):
    return datasets_for(user).filter(status=Dataset.PROCESSED, purpose="fine-tune")


def token_histogram_figure(tokens: dict) -> dict | None:
    """A Plotly bar chart of tokens per example, from the stored statistics."""
    histogram = (tokens or {}).get("histogram") or {}
    edges, counts = histogram.get("edges") or [], histogram.get("counts") or []
    if not counts:
        return None
    centers = [(edges[i] + edges[i + 1]) / 2 for i in range(len(counts))]
    widths = [edges[i + 1] - edges[i] for i in range(len(counts))]
    return {
        "data": [
            {
                "type": "bar",
                "x": centers,
                "y": counts,
                "width": widths,
                "marker": {"color": "#2563eb"},
                "name": "examples",
            }
        ],
        "layout": {
            "margin": {"l": 50, "r": 10, "t": 10, "b": 40},
            "height": 260,
            "bargap": 0.05,
            "xaxis": {"title": {"text": "tokens per example"}},
            "yaxis": {"title": {"text": "examples"}},
        },
    }
