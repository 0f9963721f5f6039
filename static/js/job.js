// The job page: draws the charts from history, then extends them live from the job's websocket.
// Each live trace names its point key and message in `meta` (jobs_app.selectors.job_figures);
// the loss chart's traces are train, smoothed train and validation loss.
(function () {
  "use strict";
  const meta = document.getElementById("job-meta");
  const figures = JSON.parse(document.getElementById("job-figures").textContent);
  const finalStatuses = ["succeeded", "failed", "cancelled"];
  const smoothing = figures.smoothing || 0.9;
  const charts = {};
  for (const [name, figure] of Object.entries(figures)) {
    const element = document.getElementById("chart-" + name);
    if (!element || !figure.data) continue;  // the charts of another objective are not on this page
    charts[name] = element;
    Plotly.newPlot(element, figure.data, figure.layout, { responsive: true, displaylogo: false });
  }
  const loss = figures.loss.data;
  let lastStep = Number(meta.dataset.lastStep) || 0;
  let lastEvalStep = loss[2].x.length ? loss[2].x[loss[2].x.length - 1] : 0;
  let smoothed = loss[1].y.length ? loss[1].y[loss[1].y.length - 1] : null;
  let points = loss[0].x.length;
  let status = meta.dataset.status;
  charts.loss.dataset.points = points;

  // Add the point's values to every trace that message extends, on every chart.
  function extendAll(kind, point, step) {
    for (const [name, element] of Object.entries(charts)) {
      const keep = [], y = [];
      figures[name].data.forEach((trace, i) => {
        const live = trace.meta;
        if (!live || live.live !== kind) return;
        const value = live.smoothed ? smoothed : point[live.key];
        if (value === null || value === undefined) return;
        keep.push(i);
        y.push([value]);
      });
      if (keep.length) Plotly.extendTraces(element, { x: keep.map(() => [step]), y }, keep);
    }
  }

  function setProgress(step, total) {
    if (total) meta.dataset.total = total;
    const t = Number(meta.dataset.total) || 0;
    document.getElementById("progress-bar").style.width = (t ? Math.min(100, (100 * step) / t) : 0) + "%";
    document.getElementById("progress-text").textContent = "step " + step + " / " + (t || "?");
  }

  function setEta(seconds) {
    if (seconds == null || finalStatuses.includes(status)) return;
    const finish = new Date(Date.now() + seconds * 1000);
    document.getElementById("job-eta").textContent = " · estimated finish " + finish.toLocaleTimeString();
  }

  // Parts the server renders (the summary with its warnings, the checkpoints table): fetch the
  // page again and swap them in, when a checkpoint or a warning says they changed.
  let refreshing = null;
  function refreshParts() {
    if (refreshing) return;
    refreshing = fetch(location.pathname, { credentials: "same-origin" })
      .then((response) => (response.ok ? response.text() : Promise.reject(response.status)))
      .then((html) => {
        const fresh = new DOMParser().parseFromString(html, "text/html");
        for (const id of ["job-summary", "checkpoints", "job-actions"]) {
          const now = document.getElementById(id), next = fresh.getElementById(id);
          if (now && next) now.replaceWith(next);
        }
      })
      .catch(() => {})
      .finally(() => { refreshing = null; });
  }

  function onMetric(m) {
    if (m.train_loss == null || m.step <= lastStep) return; // already drawn
    lastStep = m.step;
    smoothed = smoothed === null ? m.train_loss : smoothing * smoothed + (1 - smoothing) * m.train_loss;
    extendAll("metric", m, m.step);
    points += 1;
    charts.loss.dataset.points = points;
    setProgress(m.step, m.total_steps);
  }

  function onEval(m) {
    if (m.valid_loss == null || m.step <= lastEvalStep) return;
    lastEvalStep = m.step;
    extendAll("eval", m, m.step);
  }

  // Every event time in the browser's own zone, 24-hour, whether the server drew it or it came live.
  const clock = (date) => date.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit", hourCycle: "h23" });
  function localTimes(root) {
    for (const time of root.querySelectorAll("time[datetime]")) time.textContent = clock(new Date(time.getAttribute("datetime")));
  }
  // Events shown live, newest last: the server's list swapped in on joining may have been read
  // just before one of them was written, so any it lacks are put back on top.
  const live = [];
  localTimes(document);
  document.body.addEventListener("htmx:afterSwap", (e) => {
    localTimes(e.target);
    if (e.target.id !== "events") return;
    const shown = new Set(Array.from(e.target.children, (li) => li.dataset.key));
    for (const item of live) if (!shown.has(item.dataset.key)) e.target.prepend(item);
    if (live.length) e.target.querySelector("li.muted")?.remove();
  });

  // The server's list of events: on joining the live stream, anything said before it is missed.
  function reloadEvents() {
    document.body.dispatchEvent(new Event("job-events-changed"));
  }

  function onEvent(e) {
    const list = document.getElementById("events");
    const item = document.createElement("li");
    item.className = e.level || "info";
    item.dataset.key = `${e.created_at}|${e.message}`;
    live.push(item);
    if (live.length > 50) live.shift();
    const time = document.createElement("time");
    time.textContent = clock(new Date((e.created_at || Date.now() / 1000) * 1000));
    item.append(time, " " + e.message);
    list.querySelector("li.muted")?.remove();  // "No events yet."
    list.prepend(item);
    if (e.level === "warn" || e.level === "error") refreshParts();
  }

  function onStatus(s) {
    // A run that starts again (resume, retry, recovery after a lost worker) retrains the steps
    // after its checkpoint: redraw from the server's history instead of keeping the old points.
    const restarted = s.status === "running" && status !== "running" && points > 0;
    const changed = s.status !== status;
    status = s.status;
    if (restarted) { setTimeout(() => location.reload(), 300); return; }
    if (!changed) return;
    const badge = document.getElementById("job-status");
    badge.textContent = status;
    badge.className = "badge " + status;
    refreshParts();  // the buttons follow the status: Pause while running, Resume when paused
    // The final page shows the new model and other buttons: fetch it once.
    if (finalStatuses.includes(status) || status === "paused") setTimeout(() => location.reload(), 800);
  }

  const handlers = { metric: onMetric, eval: onEval, event: onEvent, status: onStatus,
                     progress: (p) => { setProgress(p.step, p.total_steps); setEta(p.eta_s); },
                     checkpoint: refreshParts };

  function connect() {
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    const socket = new WebSocket(scheme + "://" + location.host + "/ws/jobs/" + meta.dataset.job + "/");
    // Ask for anything emitted between rendering this page and joining the group.
    socket.onopen = () => { socket.send(JSON.stringify({ type: "sync", after_step: lastStep })); reloadEvents(); };
    socket.onmessage = (msg) => {
      const data = JSON.parse(msg.data);
      (handlers[data.type] || (() => {}))(data);
    };
    socket.onclose = () => { if (!finalStatuses.includes(status)) setTimeout(connect, 2000); };
  }

  if (!finalStatuses.includes(status)) connect();
})();
