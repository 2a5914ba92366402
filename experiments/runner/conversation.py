"""Conversation templates: the prompt string the official evaluations feed the model around a task's user text.

    prompt = conversation.render("vicuna_v1", "What is this?\\nAnswer the question using a single word or phrase.")
    # 'A chat between a curious user and ... questions. USER: <image>\\nWhat is this?\\n... ASSISTANT:'

Templates (facts from LLaVA's `llava/conversation.py` and lmms-eval's model wrappers, ../shared/EVAL.md section B):
- "vicuna_v1": the system text, a space, "USER: <image>\\n{text}", a space, "ASSISTANT:" (SeparatorStyle.TWO, sep " ").
  LLaVA-1.5 and llava-v1.6-vicuna in the LLaVA repository's scripts and in lmms-eval's `llava` wrapper.
- "mistral_instruct": "[INST] <image>\\n{text} [/INST]" (LLAMA_2 style with an empty system text, not wrapped in
  <<SYS>>): llava-v1.6-mistral.
- "chat_template": the checkpoint's own `chat_template` through `processor.apply_chat_template` (what lmms-eval's
  `llava_hf` wrapper does); for llava-hf checkpoints this drops the vicuna system prompt. With a `system` text (lmms-eval's
  `qwen2_5_vl` wrapper: "You are a helpful assistant.") a system message (string content) comes first, and the
  user turn holds the image then the text, as that wrapper sends them.
- "plain": "USER: <image>\\n{text} ASSISTANT:" (the runner's earlier prompt without a system text; the llava-hf
  LLaVA-1.5 chat template renders the same string).
The tokenizer adds BOS; the processor expands "<image>" to the image's feature count. LLaVA's own
`tokenizer_image_token` tokenizes the text around "<image>" in separate pieces; the processor tokenizes the whole
string with "<image>" as a special token, which can differ in how the piece after the image starts ([inference]: the
pieces begin with "\\n", which sentencepiece encodes the same way in both for LLaMA's tokenizer).
"""

__all__ = ["TEMPLATES", "VICUNA_SYSTEM", "render", "default_template"]

VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                 "helpful, detailed, and polite answers to the user's questions.")

TEMPLATES = ("vicuna_v1", "mistral_instruct", "chat_template", "plain")


def render(template: str, text: str, processor=None, system: str | None = None) -> str:
  """The prompt string for one image and one user turn `text` (without "<image>"); `processor` is needed for
  "chat_template", which alone takes a `system` message. Raises ValueError for an unknown template, a processor
  without a chat template, or a system message for another template."""
  if system is not None and template != "chat_template":
    raise ValueError(f"conversation template {template!r} takes no system message (only chat_template does)")
  if template == "vicuna_v1":
    return f"{VICUNA_SYSTEM} USER: <image>\n{text} ASSISTANT:"
  if template == "mistral_instruct":
    return f"[INST] <image>\n{text} [/INST]"
  if template == "plain":
    return f"USER: <image>\n{text} ASSISTANT:"
  if template == "chat_template":
    if processor is None or not getattr(processor, "chat_template", None):
      raise ValueError("--conv_template=chat_template: the checkpoint's processor has no chat_template")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    if system is not None:
      messages.insert(0, {"role": "system", "content": system})
    return processor.apply_chat_template(messages, add_generation_prompt=True)
  raise ValueError(f"unknown conversation template {template!r}; known: {', '.join(TEMPLATES)}")


def default_template(model_config) -> str:
  """The template the papers' evaluations used for a checkpoint: mistral_instruct for a Mistral decoder
  (llava-v1.6-mistral), vicuna_v1 otherwise (LLaVA-1.5, llava-v1.6-vicuna)."""
  return "mistral_instruct" if model_config.text.model_type == "mistral" else "vicuna_v1"
