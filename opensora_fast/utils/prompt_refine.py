"""Drop-in for ``opensora.utils.prompt_refine``: prompt refinement through a chat-completion client.

The client is pluggable: anything with OpenAI's ``client.chat.completions.create(...)``
interface. By default :func:`default_client` builds ``openai.OpenAI`` when the
``openai`` package is installed (``pip install opensora_fast[refine]``) and
``OPENAI_API_KEY`` is set. The requests (system prompts, few-shot examples,
model ``gpt-4o``, temperature 0.01, top_p 0.7) are upstream's; the prompt texts
below are Open-Sora's (Apache-2.0), kept verbatim so the requests are the same.

As upstream, a failed refinement gives the original prompt back. Unlike
upstream, that includes errors raised by the client (network, auth, rate limits:
logged as warnings and retried), and no client at all. An unknown ``type``, or
``type="i2v"`` without an image, raises ValueError.
"""

from __future__ import annotations

import base64
import os
from mimetypes import guess_type
from typing import Any

from .logger import log_message

__all__ = [
    "sys_prompt_t2v",
    "sys_prompt_t2i",
    "sys_prompt_i2v",
    "sys_prompt_motion_score",
    "REFINE_TYPES",
    "default_client",
    "image_to_url",
    "build_messages",
    "refine_prompt",
    "refine_prompts",
]

sys_prompt_t2v = 'You are part of a team of bots that creates videos. The workflow is that you first create a caption of the video, and then the assistant bot will generate the video based on the caption. You work with an assistant bot that will draw anything you say.\n\nFor example, outputting "a beautiful morning in the woods with the sun peaking through the trees" will trigger your partner bot to output an video of a forest morning, as described. You will be prompted by people looking to create detailed, amazing videos. The way to accomplish this is to take their short prompts and make them extremely detailed and descriptive.\n\nThere are a few rules to follow:\n\nYou will only ever output a single video description per user request.\n\nYou should not simply make the description longer.\n\nVideo descriptions must have the same num of words as examples below. Extra words will be ignored.\n'

sys_prompt_t2i = "You are part of a team of bots that creates videos. The workflow is that you first create an image caption for the first frame of the video, and then the assistant bot will generate the video based on the image caption.\n\nFor example, outputting \"a beautiful morning in the woods with the sun peaking through the trees\" will trigger your partner bot to output an image of a forest morning, as described. You will be prompted by people looking to create detailed, amazing videos. The way to accomplish this is to take their short prompts and make them extremely detailed and descriptive.\n\nThere are a few rules to follow:\n\nYou will only ever output a single image description per user request.\n\nYou should not simply make the description longer.\n\nImage captions must have the same num of words as examples. Extra words will be ignored.\n\nNote: The input image is the first frame of the video, and the output image caption should include dynamic information.\n\nNote: Don't contain camera transitions!!! Don't contain screen switching!!! Don't contain perspective shifts !!!\n\nNote: Use daily language to describe the video, don't use complex words or phrases!!!\n"

sys_prompt_i2v = 'You are part of a team of bots that creates videos. The workflow is that you first create a caption of the video based on the image, and then the assistant bot will generate the video based on the caption. You work with an assistant bot that will draw anything you say.\n\nGive a highly descriptive video caption based on input image and user input. As an expert, delve deep into the image with a discerning eye, leveraging rich creativity, meticulous thought. When describing the details of an video, include appropriate dynamic information to ensure that the video caption contains reasonable actions and plots. If user input is not empty, then the caption should be expanded according to the user\'s input.\n\nThe input image is the first frame of the video, and the output video caption should describe the motion starting from the current image. User input is optional and can be empty.\n\nAnswers should be comprehensive, conversational, and use complete sentences. The answer should be in English no matter what the user\'s input is. Provide context where necessary and maintain a certain tone.  Begin directly without introductory phrases like "The image/video showcases" "The photo captures" and more. For example, say "A scene of a woman on a beach", instead of "A woman is depicted in the image".\n\nNote: Must include appropriate dynamic information like actions, plots, etc. If the user prompt did not contain any dynamic information, then you must add some proper dynamic information like actions to make the video move!!!\n\nNote: Try begin the sentence with phrases like  "A scene of" or "A view of" or "A close-up of" to make the video more descriptive!!!\n\nNote: Use daily language to describe the video, don\'t use complex words or phrases!!!\n'

sys_prompt_motion_score = "\nWe define a video’s motion score as its FFMPEG VMAF motion value. We now have a video generation model that accepts a desired VMAF motion value as input. To reduce user burden, please predict an optimal motion score for generating a high-quality video based on the user’s text prompt. For reference:\n\t•\tFor runway videos featuring models, a motion score of 4 is ideal.\n\t•\tFor static videos, a motion score of 1 is preferred.\n\nOutput format:\n“{} motion score”, where {} is an integer between 1 and 15.\n\nUser input:\n"


# (user request, assistant answer) pairs shown before the real request

_VIDEO_EXAMPLES = [
    (
        'Create an imaginative video descriptive caption or modify an earlier caption for the user input : "A street with parked cars on both sides, lined with commercial buildings featuring Korean signs. The overcast sky suggests early morning or late afternoon."',
        "A view of a street lined with parked cars on both sides. the buildings flanking the street have various signs and advertisements, some of which are in korean, indicating that this might be a location in south korea. the sky is overcast, suggesting either early morning or late afternoon light. the architecture of the buildings is typical of urban commercial areas, with storefronts on the ground level and possibly offices or residences above.",
    ),
    (
        'Create an imaginative video descriptive caption or modify an earlier caption for the user input : "Hands with rings and bracelets wash small greenish-brown seeds in a blue basin under running water, likely outdoors."',
        "A close-up shot of a person's hands, adorned with rings and bracelets, washing a pile of small, round, greenish-brown seeds in a blue plastic basin. the water is running from an unseen source, likely a tap, and the person is using their hands to agitate the seeds, presumably to clean them. the background is indistinct but appears to be an outdoor setting with natural light.",
    ),
    (
        'Create an imaginative video descriptive caption or modify an earlier caption for the user input : "Three men stand near an open black car in a parking lot, with parked vehicles and a partly cloudy sky in the background."',
        "A scene showing three men in an outdoor setting, likely a parking lot. the man on the left is wearing a light blue shirt and dark shorts, the man in the middle is dressed in a white shirt with a pattern and dark shorts, and the man on the right is wearing a green shirt and jeans. they are standing near a black car with its door open. in the background, there are parked vehicles, including a white truck and a red trailer. the sky is partly cloudy, suggesting it might be a sunny day.",
    ),
]

_IMAGE_EXAMPLES = [
    (
        'Create an imaginative image descriptive caption or modify an earlier caption for the user input : "a girl on the beach"',
        "A radiant woman stands on a deserted beach, arms outstretched, wearing a beige trench coat, white blouse, light blue jeans, and chic boots, against a backdrop of soft sky and sea.",
    ),
    (
        'Create an imaginative image descriptive caption or modify an earlier caption for the user input : "A man in a blue shirt"',
        "A determined man in athletic attire, including a blue long-sleeve shirt, black shorts, and blue socks, against a backdrop of a snowy field.",
    ),
]

REFINE_TYPES = ("t2v", "t2i", "i2v", "motion_score")
_MODEL = "gpt-4o"


def default_client() -> Any | None:
    """``openai.OpenAI(api_key=$OPENAI_API_KEY)`` when openai is installed and the key is set, else None."""
    if not os.environ.get("OPENAI_API_KEY"):
        return None
    try:
        from openai import OpenAI
    except ImportError:
        return None
    return OpenAI(api_key=os.environ.get("OPENAI_API_KEY"))


def image_to_url(image_path: str) -> str:
    """The file as a ``data:{mime};base64,...`` URL (mime from the extension, else application/octet-stream)."""
    mime_type, _ = guess_type(image_path)
    if mime_type is None:
        mime_type = "application/octet-stream"
    with open(image_path, "rb") as f:
        data = base64.b64encode(f.read()).decode("utf-8")
    return f"data:{mime_type};base64,{data}"


def _examples(pairs) -> list[dict]:
    msgs = []
    for user, assistant in pairs:
        msgs.append({"role": "user", "content": user})
        msgs.append({"role": "assistant", "content": assistant})
    return msgs


def build_messages(text: str, type: str = "t2v", image_path: str | None = None) -> tuple[list[dict], int]:
    """The chat messages and ``max_tokens`` upstream sends for ``type`` (t2v, t2i, i2v, motion_score)."""
    if type not in REFINE_TYPES:
        raise ValueError(f"refine_prompt: unknown type {type!r}; accepted: {', '.join(REFINE_TYPES)}")
    if type == "t2v":
        return (
            [{"role": "system", "content": sys_prompt_t2v}]
            + _examples(_VIDEO_EXAMPLES)
            + [
                {
                    "role": "user",
                    "content": "Create an imaginative video descriptive caption or modify an earlier caption "
                    f'in ENGLISH for the user input: " {text} "',
                }
            ],
            250,
        )
    if type == "t2i":
        return (
            [{"role": "system", "content": sys_prompt_t2i}]
            + _examples(_IMAGE_EXAMPLES)
            + [
                {
                    "role": "user",
                    "content": "Create an imaginative image descriptive caption or modify an earlier caption "
                    f'in ENGLISH for the user input: " {text} "',
                }
            ],
            250,
        )
    if type == "i2v":
        if image_path is None:
            raise ValueError("refine_prompt(type='i2v') needs image_path")
        return (
            [{"role": "system", "content": sys_prompt_i2v}]
            + _examples(_VIDEO_EXAMPLES)
            + [
                {
                    "role": "user",
                    "content": "Create an imaginative video descriptive caption or modify an earlier caption "
                    f'in ENGLISH for the user input based on the image: " {text} "',
                },
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_to_url(image_path)}}]},
            ],
            250,
        )
    return [{"role": "system", "content": sys_prompt_motion_score}, {"role": "user", "content": f"{text}"}], 100


def refine_prompt(
    prompt: str, retry_times: int = 3, type: str = "t2v", image_path: str | None = None, client: Any = None
) -> str:
    """Ask the chat model to refine ``prompt`` (``type``: t2v, t2i, i2v with ``image_path``, or motion_score).

    Up to ``retry_times`` tries; the first answer with a choice wins. When every
    try fails (no choices, or the client raises), or there is no client, the
    original ``prompt`` is returned. ``client`` defaults to :func:`default_client`.
    """
    messages, max_tokens = build_messages(prompt.strip(), type=type, image_path=image_path)
    if client is None:
        client = default_client()
        if client is None:
            log_message(
                "refine_prompt: no client (pip install opensora_fast[refine] and set OPENAI_API_KEY); "
                "keeping the prompt",
                level="warning",
            )
            return prompt
    for attempt in range(retry_times):
        try:
            response = client.chat.completions.create(
                messages=messages, model=_MODEL, temperature=0.01, top_p=0.7, stream=False, max_tokens=max_tokens
            )
        except Exception as e:  # any client failure: retry, then fall back to the prompt
            log_message("refine_prompt: try %d of %d failed: %r", attempt + 1, retry_times, e, level="warning")
            continue
        if response is not None and getattr(response, "choices", None):
            return response.choices[0].message.content
    return prompt


def refine_prompts(
    prompts: list[str],
    retry_times: int = 3,
    type: str = "t2v",
    image_paths: list[str] | None = None,
    client: Any = None,
) -> list[str]:
    """:func:`refine_prompt` for each prompt (with its image path for i2v)."""
    if image_paths is None:
        image_paths = [None] * len(prompts)
    if client is None:
        client = default_client()
    return [
        refine_prompt(p, retry_times=retry_times, type=type, image_path=ip, client=client)
        for p, ip in zip(prompts, image_paths)
    ]
