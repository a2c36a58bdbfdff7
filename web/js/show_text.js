// Latent-CLIP: show a node's text result on the canvas.
//
// The pack's nodes send their reports (Judge verdicts, scores, filter and guidance reports, ReNO and search
// summaries) to the front end as the executed message's `text` (ui.PreviewText). The bundled front end draws
// such text only for core's Preview Any; this extension writes it into a read-only multiline widget on the
// pack's own nodes (node types starting with PREFIXES), created on the node's first result. It is not saved
// with the workflow and not sent with the prompt. Nodes of other packs and graphs without this pack's nodes
// are left alone.
import { app } from "../../../scripts/app.js";
import { ComfyWidgets } from "../../../scripts/widgets.js";

const PREFIXES = ["LatentCLIP", "PixelCLIP"];
const RESULT_WIDGET = "result";

function isPackNode(name) {
  return typeof name === "string" && PREFIXES.some((prefix) => name.startsWith(prefix));
}

function asText(text) {
  return (Array.isArray(text) ? text : [text]).map((t) => (t == null ? "" : String(t))).join("\n");
}

function showText(node, text) {
  let widget = node.widgets?.find((w) => w.name === RESULT_WIDGET);
  if (!widget) {
    widget = ComfyWidgets.STRING(node, RESULT_WIDGET, ["STRING", { multiline: true }], app).widget;
    const element = widget.inputEl ?? widget.element;
    if (element) element.readOnly = true;
    widget.serialize = false; // not in the saved workflow's widgets_values
    if (widget.options) widget.options.serialize = false; // not in the prompt either
    // grow only if the node is smaller than its widgets need (the example workflows reserve the room)
    const need = node.computeSize();
    if (need[0] > node.size[0] || need[1] > node.size[1]) {
      node.setSize([Math.max(node.size[0], need[0]), Math.max(node.size[1], need[1])]);
    }
  }
  widget.value = asText(text);
  node.setDirtyCanvas?.(true, true);
}

app.registerExtension({
  name: "LatentCLIP.ShowText",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!isPackNode(nodeData?.name)) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      const result = onExecuted?.apply(this, arguments);
      if (message?.text != null) {
        try {
          showText(this, message.text);
        } catch (error) {
          console.error("Latent-CLIP: could not show the node's text", error);
        }
      }
      return result;
    };
  },
});
