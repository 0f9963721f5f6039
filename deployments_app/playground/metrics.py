"""Answer-versus-reference scores for the playground's batch compare."""

MAX_SCORED_WORDS = 2000
"""ROUGE-L reads at most this many words of each text: the LCS costs their product in time."""


def _words(text: str) -> list[str]:
    return text.split()


def lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence, in O(len(a) * len(b)) time and O(len(b)) memory."""
    if len(b) > len(a):
        a, b = b, a
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b, start=1):
            current.append(previous[j - 1] + 1 if x == y else max(previous[j], current[j - 1]))
        previous = current
    return previous[-1]


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1 over whitespace tokens: the LCS's precision and recall, harmonically averaged.

    Each text counts up to its first MAX_SCORED_WORDS words (2,000 by 2,000 is about a second of
    Python); an answer that long has stopped being a short answer ROUGE-L says much about.
    """
    cand, ref = _words(candidate)[:MAX_SCORED_WORDS], _words(reference)[:MAX_SCORED_WORDS]
    if not cand and not ref:
        return 1.0
    common = lcs_length(cand, ref)
    if common == 0:
        return 0.0
    precision, recall = common / len(cand), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def exact_match(candidate: str, reference: str) -> bool:
    """Equal once surrounding and repeated whitespace is ignored."""
    return _words(candidate) == _words(reference)
