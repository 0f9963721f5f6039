// The dataset upload form: refuse a file over the limit before sending a byte, and
// show how much of a large upload has gone. Without JavaScript the form posts as usual.
(function () {
  const form = document.querySelector("form[data-upload]");
  if (!form) return;
  const input = form.querySelector("input[type=file]");
  const status = form.querySelector("[data-upload-status]");
  const bar = form.querySelector("[data-upload-bar]");
  const limit = () => Number(form.dataset.maxBytes);

  function human(n) {
    const units = ["bytes", "KB", "MB", "GB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
    return i === 0 ? `${n} bytes` : `${n.toFixed(1)} ${units[i]}`;
  }

  function say(text, isError) {
    status.textContent = text;
    status.classList.toggle("error", Boolean(isError));
    status.hidden = !text;
  }

  input.addEventListener("change", () => {
    const file = input.files[0];
    if (file && file.size > limit()) {
      say(`${file.name} is ${human(file.size)}, over the limit of ${human(limit())} (FT_MAX_UPLOAD_BYTES).`, true);
    } else {
      say("");
    }
  });

  form.addEventListener("submit", (event) => {
    const file = input.files[0];
    if (!file) return;
    event.preventDefault();
    if (file.size > limit()) {
      say(`${file.name} is ${human(file.size)}, over the limit of ${human(limit())} (FT_MAX_UPLOAD_BYTES).`, true);
      return;
    }
    const button = form.querySelector("button[type=submit]");
    button.disabled = true;
    bar.parentElement.hidden = false;
    const request = new XMLHttpRequest();
    request.open("POST", form.action);
    request.setRequestHeader("X-Upload-Progress", "1");
    request.upload.addEventListener("progress", (e) => {
      if (!e.lengthComputable) return;
      bar.style.width = `${(100 * e.loaded / e.total).toFixed(1)}%`;
      say(`Uploading ${file.name}: ${human(e.loaded)} of ${human(e.total)}`);
    });
    request.addEventListener("load", () => {
      let next = null;
      try { next = JSON.parse(request.responseText).location; } catch (e) { /* an error page, below */ }
      if (request.status === 200 && next) {
        window.location.assign(next);  // the list, with the server's message
      } else {
        const page = new DOMParser().parseFromString(request.responseText, "text/html");
        const reason = page.querySelector(".flash.error");
        say(reason ? reason.textContent : `The upload failed (HTTP ${request.status}).`, true);
        button.disabled = false;
        bar.parentElement.hidden = true;
      }
    });
    request.addEventListener("error", () => {
      say("The upload was interrupted; nothing was stored. Check the connection and try again.", true);
      button.disabled = false;
      bar.parentElement.hidden = true;
    });
    request.send(new FormData(form));
  });
})();
