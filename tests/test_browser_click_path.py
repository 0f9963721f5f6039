"""The main click path in Debian's Chromium, driven by Playwright, against the live stack."""

import json
import shutil

import pytest

from llm.bundled import BUNDLED_MODEL_ID

from .live import ADMIN_PASSWORD

pytestmark = [pytest.mark.live, pytest.mark.browser, pytest.mark.realmodel, pytest.mark.timeout(900)]

CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-sync",
    "--disable-background-networking",
    "--disable-component-update",
]


def support_dataset(path):
    rows = []
    for i in range(16):
        rows.append(
            {
                "messages": [
                    {"role": "system", "content": "You are the support bot of Acme Bank."},
                    {"role": "user", "content": f"My card number {i} was declined, what do I do?"},
                    {
                        "role": "assistant",
                        "content": "Please open the Acme app, tap Cards, then Unblock. Acme support is here to help.",
                    },
                ]
            }
        )
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


@pytest.fixture
def page(stack, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (make test installs it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS)
        context = browser.new_context(viewport={"width": 1400, "height": 1000})
        page = context.new_page()
        page.set_default_timeout(60_000)
        yield page
        page.screenshot(path=str(tmp_path / "last.png"), full_page=True)
        browser.close()


def test_a_user_clicks_from_upload_to_side_by_side_answers(stack, page, tmp_path):
    from playwright.sync_api import expect

    page.goto(stack.url + "/")
    page.get_by_label("Username").fill("admin")
    page.get_by_label("Password").fill(ADMIN_PASSWORD)
    page.get_by_role("button", name="Log in").click()
    expect(page.get_by_role("heading", name="Overview")).to_be_visible()

    page.get_by_role("link", name="Datasets", exact=True).click()
    # A file over the limit is refused in the page, before a byte is sent (the limit is
    # lowered in the page only: the stack's 1 GB is too large to try).
    posts = []
    page.on("request", lambda request: posts.append(request.url) if request.method == "POST" else None)
    page.evaluate("document.querySelector('form[data-upload]').dataset.maxBytes = '100'")
    page.get_by_test_id("dataset-file").set_input_files(str(support_dataset(tmp_path / "support.jsonl")))
    expect(page.get_by_test_id("upload-status")).to_contain_text("over the limit of 100 bytes")
    page.get_by_role("button", name="Upload").click()
    expect(page.get_by_test_id("upload-status")).to_contain_text("over the limit of 100 bytes")
    assert posts == []
    page.evaluate("document.querySelector('form[data-upload]').dataset.maxBytes = String(2 ** 30)")
    page.get_by_role("button", name="Upload").click()
    expect(page.get_by_text("Uploaded support.jsonl. Every line is checked in the background")).to_be_visible()
    assert len(posts) == 1 and posts[0].endswith("/datasets/upload/")
    expect(page.get_by_test_id("dataset-status").first).to_have_text("ready")

    page.get_by_role("link", name="Fine-tuning", exact=True).click()
    page.get_by_role("link", name="Create fine-tuning task").first.click()
    page.get_by_label("Base model").select_option(BUNDLED_MODEL_ID)
    page.get_by_label("Epochs").fill("2")
    page.get_by_label("Batch size").fill("4")
    page.get_by_label("Model name suffix").fill("browser")
    page.get_by_role("button", name="Start fine-tuning").click()

    expect(page.get_by_test_id("job-status")).to_be_visible()
    page.evaluate("window.__sameDocument = true")
    points = "Number(document.querySelector('[data-testid=loss-chart]').dataset.points)"
    page.wait_for_function(f"{points} >= 1", timeout=300_000)
    first = page.evaluate(points)
    page.wait_for_function(f"{points} > {first}", timeout=300_000)
    assert page.evaluate("window.__sameDocument") is True, "the curve grew through a reload, not live"

    # The page reloads itself once the job is final, showing the new model.
    expect(page.get_by_test_id("open-playground")).to_be_visible(timeout=600_000)
    expect(page.get_by_test_id("job-status")).to_have_text("succeeded")
    page.get_by_test_id("open-playground").click()

    expect(page.get_by_test_id("model-a")).to_have_value(BUNDLED_MODEL_ID)
    assert page.get_by_test_id("model-b").input_value().startswith(f"ft:{BUNDLED_MODEL_ID}:admin:browser:")
    page.get_by_label("Max tokens").fill("40")
    page.get_by_test_id("prompt").fill("My card was declined, what do I do?")
    page.get_by_test_id("send").click()
    for side in ("a", "b"):
        answer = page.get_by_test_id(f"answer-{side}").locator(".msg.assistant")
        expect(answer).to_have_attribute("data-done", "1", timeout=180_000)
        text = answer.inner_text()
        assert text.strip() and not text.startswith("Error"), text

    # Batch compare: a run per model on the stack's evaluations worker, the results polled into the page.
    page.evaluate("window.__batchPage = true")
    page.get_by_label("Max tokens").fill("8")
    page.get_by_label("Validation prompts").fill("2")
    page.get_by_test_id("batch-run").click()
    expect(page.get_by_test_id("batch-totals")).to_have_attribute("data-done", "1", timeout=300_000)
    expect(page.get_by_test_id("batch-row")).to_have_count(2)
    totals = page.get_by_test_id("batch-total")
    expect(totals).to_have_count(2)
    for index in range(2):
        expect(totals.nth(index)).to_contain_text("completed")
        expect(totals.nth(index)).to_contain_text("over 2 prompts")
    assert page.get_by_test_id("batch-eval-link").get_attribute("href").startswith("/evals/eval")
    assert page.evaluate("window.__batchPage") is True, "the results came through a reload, not the partial"
