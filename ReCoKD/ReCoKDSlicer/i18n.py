"""Translation of the texts the logic shows the user, as Slicer's own modules do: ``_("text")``.

Inside Slicer >= 5.4 ``_`` is ``slicer.i18n.tr`` itself, re-exported, not wrapped: ``tr`` names its
translation context after the file that calls it (``ReCoKDSlicer.logic``, ...), and ``lupdate`` finds the
``_()`` strings there. Under slicer-core or an older Slicer, where ``slicer.i18n`` is absent, both
functions return the English text unchanged. A text with values is translated first and filled after:
``_("model '{name}' ...").format(name=...)`` (an f-string would be filled before the lookup).
"""

__all__ = ["_", "translate"]

try:  # Slicer >= 5.4: the user's language
    from slicer.i18n import tr as _
    from slicer.i18n import translate
except ImportError:  # slicer-core, older Slicer: English

    def _(text):
        return text

    def translate(context, text):
        return text
