// Side-by-side chat: the same conversation and settings sent to each pane's model,
// answers streamed from /v1/chat/completions as they are generated. Also: samples
// from the validation set, the rendered chat template, copy-as-code, batch compare
// (evaluation runs on the worker, their results polled by htmx).
(function () {
  "use strict";
  const panes = Array.from(document.querySelectorAll(".pane"));
  const csrf = document.querySelector("input[name=csrfmiddlewaretoken]").value;
  const settings = document.getElementById("playground-form");
  const promptBox = document.getElementById("prompt");
  const codeView = document.getElementById("code-view");
  const referenceView = document.getElementById("reference");
  const history = new Map(panes.map((p) => [p, []]));

  const modelOf = (pane) => pane.querySelector(".model-select").value;
  const activePanes = () => panes.filter((pane) => modelOf(pane));

  function samplingSettings() {
    const e = settings.elements;
    const body = { temperature: Number(e.temperature.value), top_p: Number(e.top_p.value) || 1, max_tokens: Number(e.max_tokens.value) };
    if (e.seed.value !== "") body.seed = Number(e.seed.value);
    return body;
  }

  function conversation(pane, userText) {
    const system = settings.elements.system.value.trim();
    const turns = history.get(pane).concat(userText ? [{ role: "user", content: userText }] : []);
    return (system ? [{ role: "system", content: system }] : []).concat(turns);
  }

  function requestBody(pane, userText, stream) {
    return Object.assign({ model: modelOf(pane), messages: conversation(pane, userText), stream }, samplingSettings());
  }

  async function postJson(url, body) {
    const response = await fetch(url, {
      method: "POST", credentials: "same-origin",
      headers: { "Content-Type": "application/json", "X-CSRFToken": csrf },
      body: JSON.stringify(body),
    });
    if (!response.ok) {
      const err = await response.json().catch(() => ({}));
      throw new Error((err.error && err.error.message) || response.statusText);
    }
    return response;
  }

  function bubble(pane, role, text) {
    const div = document.createElement("div");
    div.className = "msg " + role;
    div.textContent = text;
    pane.querySelector(".transcript").append(div);
    return div;
  }

  // Yields each record of a streamed response body: separator "\n\n" for SSE, "\n" for NDJSON.
  async function* records(response, separator) {
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf(separator)) >= 0) {
        yield buffer.slice(0, cut);
        buffer = buffer.slice(cut + separator.length);
      }
    }
  }

  const FINISHED = { stop: "finished", length: "stopped at the max tokens limit", tool_calls: "called a tool" };

  // Under an answer: how long it is, how long it took, and why it ended.
  function caption(pane, usage, seconds, finish) {
    const parts = [];
    if (usage) parts.push(`${usage.completion_tokens} tokens`);
    parts.push(`${seconds.toFixed(1)} s`);
    if (usage && seconds > 0) parts.push(`${(usage.completion_tokens / seconds).toFixed(1)} tokens/s`);
    if (finish) parts.push(FINISHED[finish] || finish);
    const note = document.createElement("div");
    note.className = "msg-meta";
    note.textContent = parts.join(" · ");
    pane.querySelector(".transcript").append(note);
  }

  async function ask(pane, userText) {
    const body = Object.assign(requestBody(pane, userText, true), { stream_options: { include_usage: true } });
    history.get(pane).push({ role: "user", content: userText });
    bubble(pane, "user", userText);
    const out = bubble(pane, "assistant pending", "");
    const started = Date.now();
    let answer = "", usage = null, finish = null;
    try {
      const response = await postJson("/v1/chat/completions", body);
      for await (const record of records(response, "\n\n")) {
        const line = record.trim();
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        const choice = chunk.choices && chunk.choices[0];
        if (choice && choice.delta && choice.delta.content) {
          answer += choice.delta.content;
          out.textContent = answer.trimEnd();  // trailing newlines would only stretch the bubble
        }
        if (choice && choice.finish_reason) finish = choice.finish_reason;
        if (chunk.usage) usage = chunk.usage;
      }
      out.classList.remove("pending");
      if (!answer.trim()) {
        out.textContent = "(no visible text: the answer was only whitespace)";
        out.classList.add("empty");
      }
      out.dataset.done = "1";
      caption(pane, usage, (Date.now() - started) / 1000, finish);
      history.get(pane).push({ role: "assistant", content: answer });
    } catch (error) {
      out.classList.remove("pending");
      out.classList.add("error");
      out.dataset.done = "1";
      out.textContent = "Error: " + error.message;
      history.get(pane).pop();
    }
  }

  function show(text) {
    codeView.hidden = false;
    codeView.textContent = text;
  }

  async function copy(text) {
    show(text);
    try { await navigator.clipboard.writeText(text); codeView.dataset.copied = "1"; } catch (e) { codeView.dataset.copied = "0"; }
  }

  // The fine-tuned model whose data feeds "Sample" and batch compare: the right-most one chosen.
  function sourceModel() {
    const tuned = activePanes().map(modelOf).filter((m) => m.startsWith("ft:"));
    return tuned.length ? tuned[tuned.length - 1] : modelOf(panes[1]);
  }

  const firstPane = () => activePanes()[panes.length > 1 ? 1 : 0] || panes[0];

  // A sampled example's earlier turns become every pane's conversation so far, so
  // each model answers its last user message in the example's full context.
  function seedConversations(turns) {
    panes.forEach((pane) => {
      history.set(pane, turns.map((turn) => Object.assign({}, turn)));
      pane.querySelector(".transcript").innerHTML = "";
      turns.forEach((turn) => bubble(pane, turn.role, typeof turn.content === "string" ? turn.content : JSON.stringify(turn.content || turn.tool_calls)));
    });
  }

  document.getElementById("prompt-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = promptBox.value.trim();
    if (!text) return;
    promptBox.value = "";
    activePanes().forEach((pane) => ask(pane, text));
  });
  document.getElementById("clear").addEventListener("click", () => {
    panes.forEach((pane) => { history.set(pane, []); pane.querySelector(".transcript").innerHTML = ""; });
    referenceView.hidden = true;
  });
  promptBox.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) { event.preventDefault(); document.getElementById("prompt-form").requestSubmit(); }
  });

  document.getElementById("sample").addEventListener("click", async () => {
    const response = await fetch("/playground/sample/?model=" + encodeURIComponent(sourceModel()), { credentials: "same-origin" });
    const body = await response.json();
    if (!response.ok) { show("Error: " + body.error.message); return; }
    settings.elements.system.value = body.system || "";
    seedConversations(body.history || []);
    promptBox.value = body.prompt;
    referenceView.hidden = false;
    referenceView.textContent = "Reference answer: " + body.reference;
  });

  document.getElementById("show-template").addEventListener("click", async () => {
    const pane = firstPane();
    try {
      const response = await postJson("/playground/template/", { model: modelOf(pane), messages: conversation(pane, promptBox.value.trim() || "…") });
      const body = await response.json();
      show(`Chat template of ${body.model} (${body.prompt_tokens} tokens):\n\n${body.prompt}`);
    } catch (error) { show("Error: " + error.message); }
  });

  document.getElementById("copy-curl").addEventListener("click", () => {
    const body = requestBody(firstPane(), promptBox.value.trim() || "Hello!", false);
    const json = JSON.stringify(body, null, 2).replace(/'/g, "'\\''");
    copy(`curl ${location.origin}/v1/chat/completions \\\n  -H "Authorization: Bearer $FT_API_KEY" \\\n  -H "Content-Type: application/json" \\\n  -d '${json}'`);
  });

  document.getElementById("copy-python").addEventListener("click", () => {
    const body = requestBody(firstPane(), promptBox.value.trim() || "Hello!", false);
    const extra = Object.entries(samplingSettings()).map(([k, v]) => `    ${k}=${JSON.stringify(v)},`).join("\n");
    copy(`import os\nfrom openai import OpenAI\n\nclient = OpenAI(base_url="${location.origin}/v1", api_key=os.environ["FT_API_KEY"])\n` +
      `answer = client.chat.completions.create(\n    model=${JSON.stringify(body.model)},\n    messages=${JSON.stringify(body.messages)},\n${extra}\n)\n` +
      `print(answer.choices[0].message.content)\n`);
  });

  // Batch compare starts an evaluation run per model on the worker; the results partial then
  // polls the page's own URL (hx-trigger "every 2s") until every run has ended.
  document.getElementById("batch-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const models = Array.from(new Set(activePanes().map(modelOf)));  // one run per model
    const failure = document.getElementById("batch-error");
    failure.hidden = true;
    const body = Object.assign({ models, source: sourceModel(), n: Number(event.target.elements.n.value),
      system: settings.elements.system.value.trim() }, samplingSettings());
    try {
      const response = await postJson("/playground/batch/", body);
      const started = await response.json();
      const here = new URL(location.href);
      here.searchParams.set("batch", started.id);  // a reload shows these results again
      window.history.replaceState(null, "", here);  // `history` here is the panes' conversations
      await htmx.ajax("GET", started.progress_url, { target: "#batch-results", swap: "outerHTML" });
    } catch (error) {
      failure.hidden = false;
      failure.textContent = "Error: " + error.message;
    }
  });
})();
