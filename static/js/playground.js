// Side-by-side chat: the same conversation and settings sent to each pane's model,
// answers streamed from /v1/chat/completions as they are generated.
(function () {
  "use strict";
  const panes = Array.from(document.querySelectorAll(".pane"));
  const csrf = document.querySelector("input[name=csrfmiddlewaretoken]").value;
  const settings = document.getElementById("playground-form");
  const history = new Map(panes.map((p) => [p, []]));

  function bubble(pane, role, text) {
    const div = document.createElement("div");
    div.className = "msg " + role;
    div.textContent = text;
    pane.querySelector(".transcript").append(div);
    return div;
  }

  async function ask(pane, userText) {
    const model = pane.querySelector(".model-select").value;
    const messages = history.get(pane);
    const system = settings.elements.system.value.trim();
    messages.push({ role: "user", content: userText });
    bubble(pane, "user", userText);
    const out = bubble(pane, "assistant pending", "");
    const body = {
      model, stream: true,
      messages: (system ? [{ role: "system", content: system }] : []).concat(messages),
      temperature: Number(settings.elements.temperature.value),
      max_tokens: Number(settings.elements.max_tokens.value),
    };
    let answer = "";
    try {
      const response = await fetch("/v1/chat/completions", {
        method: "POST", credentials: "same-origin",
        headers: { "Content-Type": "application/json", "X-CSRFToken": csrf },
        body: JSON.stringify(body),
      });
      if (!response.ok) {
        const err = await response.json().catch(() => ({}));
        throw new Error((err.error && err.error.message) || response.statusText);
      }
      const reader = response.body.getReader();
      const decoder = new TextDecoder();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, { stream: true });
        let cut;
        while ((cut = buffer.indexOf("\n\n")) >= 0) {
          const line = buffer.slice(0, cut).trim();
          buffer = buffer.slice(cut + 2);
          if (!line.startsWith("data:")) continue;
          const data = line.slice(5).trim();
          if (data === "[DONE]") continue;
          const chunk = JSON.parse(data);
          if (chunk.error) throw new Error(chunk.error.message);
          const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
          if (delta && delta.content) { answer += delta.content; out.textContent = answer; }
        }
      }
      out.classList.remove("pending");
      out.dataset.done = "1";
      messages.push({ role: "assistant", content: answer });
    } catch (error) {
      out.classList.remove("pending");
      out.classList.add("error");
      out.dataset.done = "1";
      out.textContent = "Error: " + error.message;
      messages.pop();
    }
  }

  document.getElementById("prompt-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const input = document.getElementById("prompt");
    const text = input.value.trim();
    if (!text) return;
    input.value = "";
    panes.forEach((pane) => ask(pane, text));
  });
  document.getElementById("clear").addEventListener("click", () => {
    panes.forEach((pane) => { history.set(pane, []); pane.querySelector(".transcript").innerHTML = ""; });
  });
  document.getElementById("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) { event.preventDefault(); document.getElementById("prompt-form").requestSubmit(); }
  });
})();
