// The create form follows the data: choosing a training file sets the objective it trains
// (preference pairs: DPO, chat examples: SFT), and fields of one objective only (beta) show
// for it alone. Without this script the server still picks the objective from the file.
(function () {
  "use strict";
  const form = document.querySelector("form.grid-form");
  const objectives = JSON.parse(document.getElementById("dataset-objectives").textContent);
  const trainingFile = form && form.elements.namedItem("training_file");
  const objective = form && form.elements.namedItem("objective");
  if (!trainingFile || !objective) return;

  function showFieldsOf(current) {
    for (const label of form.querySelectorAll("[data-objectives]")) {
      const shown = label.dataset.objectives.split(" ").includes(current);
      label.hidden = !shown;
      // A hidden field is disabled so that a value typed earlier is not sent with another objective.
      for (const input of label.querySelectorAll("input, select")) input.disabled = !shown;
    }
  }

  trainingFile.addEventListener("change", () => {
    const trains = objectives[trainingFile.value];
    if (trains) objective.value = trains;
    showFieldsOf(objective.value);
  });
  objective.addEventListener("change", () => showFieldsOf(objective.value));
  showFieldsOf(objective.value);
})();
