// Draws every static chart on a page: <div data-figure="ID"> with its figure in json_script ID.
(function () {
  "use strict";
  function draw(root) {
    root.querySelectorAll("[data-figure]").forEach((el) => {
      if (el.dataset.drawn) return;
      const source = document.getElementById(el.dataset.figure);
      if (!source || typeof Plotly === "undefined") return;
      const figure = JSON.parse(source.textContent);
      Plotly.newPlot(el, figure.data, figure.layout, { responsive: true, displaylogo: false, staticPlot: el.dataset.static === "1" });
      el.dataset.drawn = "1";
    });
  }
  document.addEventListener("DOMContentLoaded", () => draw(document));
  document.addEventListener("htmx:afterSettle", (event) => draw(event.target));
})();
