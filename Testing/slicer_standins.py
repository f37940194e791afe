"""Minimal stand-ins for the C++ (Qt, CTK, MRML widget) classes of 3D Slicer, so that the module's
Widget runs under plain Python against Slicer's *real* Python layer (``../shared/slicer-python``:
``parameterNodeWrapper``, ``ScriptedLoadableModule``, ``i18n``) and the real MRML data model
(``slicer-core``).

Only behaviour the module and Slicer's GUI connectors rely on is modelled: properties, old- and
new-style signals, combo-box items, spin-box ranges, path edits, node selectors. The ``.ui`` file is
read by :func:`load_ui`, which instantiates *exactly* the classes it declares (an unknown class fails),
so a binding the real Slicer rejects (e.g. a ``str`` on a ``QComboBox`` without ``Choice``) fails here
too: the connectors check ``type(widget)``.
"""

from __future__ import annotations

import importlib.util
import sys
import types
import xml.etree.ElementTree as ET
from pathlib import Path

# -- signals and objects -------------------------------------------------------------------------


class Signal:
    def __init__(self):
        self._slots = []

    def connect(self, slot):
        self._slots.append(slot)

    def disconnect(self, slot=None):
        if slot is None:
            self._slots.clear()
        elif slot in self._slots:
            self._slots.remove(slot)
        else:
            raise RuntimeError("disconnect() of a slot that is not connected")

    def emit(self, owner, *args):
        if owner._signalsBlocked:
            return
        for slot in list(self._slots):
            _call(slot, args)


def _call(slot, args):
    """Qt calls a slot with as many of the signal's arguments as it takes."""
    import inspect

    try:
        params = inspect.signature(slot).parameters.values()
    except (TypeError, ValueError):
        return slot(*args)
    if any(p.kind == p.VAR_POSITIONAL for p in params):
        return slot(*args)
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return slot(*args[:len(positional)])


class QObject:
    SIGNALS: tuple[str, ...] = ()

    def __init__(self, parent=None):
        self._properties = {}
        self._signalsBlocked = False
        self._children = []
        self._parent = None
        self.objectName = ""
        for name in self._allSignals():
            setattr(self, name, Signal())
        if parent is not None:
            self.setParent(parent)

    @classmethod
    def _allSignals(cls):
        names = []
        for klass in cls.__mro__:
            names += list(getattr(klass, "SIGNALS", ()))
        return names

    def _emit(self, name, *args):
        getattr(self, name).emit(self, *args)

    def property(self, name):
        return self._properties.get(name)

    def setProperty(self, name, value):
        self._properties[name] = value

    def connect(self, signature, slot):
        getattr(self, signature.split("(")[0]).connect(slot)

    def disconnect(self, signature, slot):
        getattr(self, signature.split("(")[0]).disconnect(slot)

    def blockSignals(self, block):
        previous, self._signalsBlocked = self._signalsBlocked, bool(block)
        return previous

    def setParent(self, parent):
        self._parent = parent
        parent._children.append(self)

    def parent(self):
        return self._parent

    def findChildren(self, cls):
        found = []
        for child in self._children:
            if isinstance(child, cls):
                found.append(child)
            found += child.findChildren(cls)
        return found


class QWidget(QObject):
    def __init__(self, parent=None):
        super().__init__(parent)
        self.visible = True
        self.enabled = True
        self.toolTip = ""
        self._layout = None

    def isWidgetType(self):
        return True

    def setVisible(self, visible):
        self.visible = bool(visible)

    def show(self):
        self.visible = True

    def setEnabled(self, enabled):
        self.enabled = bool(enabled)

    def setToolTip(self, text):
        self.toolTip = text

    def setLayout(self, layout):
        self._layout = layout

    def layout(self):
        return self._layout


class QLayout:
    def __init__(self, parent=None):
        self.widgets = []

    def addWidget(self, widget, *args):
        self.widgets.append(widget)

    def addRow(self, *args):
        pass


class QLabel(QWidget):
    def __init__(self, text="", parent=None):
        super().__init__(parent)
        self.text = text


class QAbstractButton(QWidget):
    SIGNALS = ("clicked", "toggled")

    def __init__(self, text="", parent=None):
        super().__init__(parent)
        self.text = text
        self.checkable = False
        self._checked = False

    @property
    def checked(self):
        return self._checked

    @checked.setter
    def checked(self, value):
        if bool(value) != self._checked:
            self._checked = bool(value)
            self._emit("toggled", self._checked)
            self._changed()

    def setChecked(self, value):
        self.checked = value

    def _changed(self):
        pass

    def click(self):
        if not self.enabled:
            return
        if self.checkable:
            self.checked = not self.checked
        self._emit("clicked", self.checked)


class QPushButton(QAbstractButton):
    pass


class QToolButton(QAbstractButton):
    pass


class QCheckBox(QAbstractButton):
    SIGNALS = ("stateChanged",)

    def __init__(self, text="", parent=None):
        super().__init__(text, parent)
        self.checkable = True

    def _changed(self):
        self._emit("stateChanged", 2 if self._checked else 0)


class _Ranged(QWidget):
    SIGNALS = ("valueChanged",)
    CAST = float

    def __init__(self, parent=None):
        super().__init__(parent)
        self.minimum, self.maximum = 0, 99
        self.decimals, self.singleStep = 2, 1
        self._value = self.CAST(0)

    def setRange(self, minimum, maximum):
        self.minimum, self.maximum = minimum, maximum
        self.value = self._value

    def setMinimum(self, minimum):
        self.setRange(minimum, self.maximum)

    def setMaximum(self, maximum):
        self.setRange(self.minimum, maximum)

    @property
    def value(self):
        return self._value

    @value.setter
    def value(self, v):
        v = self.CAST(min(max(v, self.minimum), self.maximum))
        if v != self._value:
            self._value = v
            self._emit("valueChanged", v)

    def setValue(self, v):
        self.value = v


class QSpinBox(_Ranged):
    CAST = int


class QDoubleSpinBox(_Ranged):
    CAST = float


class QSlider(_Ranged):
    CAST = int


class QProgressBar(QWidget):
    def __init__(self, parent=None):
        super().__init__(parent)
        self.value = 0

    def setValue(self, v):
        self.value = int(v)


class QComboBox(QWidget):
    SIGNALS = ("currentIndexChanged", "currentTextChanged")

    def __init__(self, parent=None):
        super().__init__(parent)
        self.items: list[str] = []
        self._index = -1

    @property
    def currentIndex(self):
        return self._index

    @currentIndex.setter
    def currentIndex(self, index):
        index = index if 0 <= index < len(self.items) else -1
        if index != self._index:
            self._index = index
            self._emit("currentIndexChanged", index)
            self._emit("currentTextChanged", self.currentText)

    def setCurrentIndex(self, index):
        self.currentIndex = index

    @property
    def currentText(self):
        return self.items[self._index] if self._index >= 0 else ""

    @property
    def count(self):
        return len(self.items)

    def itemText(self, index):
        return self.items[index] if 0 <= index < len(self.items) else ""

    def addItem(self, text):
        self.items.append(str(text))
        if self._index < 0:
            self.currentIndex = 0

    def addItems(self, texts):
        for t in texts:
            self.addItem(t)

    def insertItem(self, index, text):
        self.items.insert(index, str(text))

    def removeItem(self, index):
        if 0 <= index < len(self.items):
            del self.items[index]
            if self._index >= len(self.items):
                self.currentIndex = len(self.items) - 1

    def clear(self):
        self.items = []
        self.currentIndex = -1


class Qt:
    """``qt.Qt``: the enum values the module uses."""

    Unchecked, PartiallyChecked, Checked = 0, 1, 2


class _ModelIndex:
    def __init__(self, row):
        self._row = row

    def row(self):
        return self._row

    def isValid(self):
        return self._row >= 0


class _ItemModel:
    def __init__(self, combo):
        self._combo = combo

    def index(self, row, column=0):
        return _ModelIndex(row if 0 <= row < len(self._combo.items) else -1)

    def rowCount(self):
        return len(self._combo.items)


class ctkCheckableComboBox(QComboBox):
    """CTK's combo box with a check box per item (new items start checked, as CTK's do)."""

    SIGNALS = ("checkedIndexesChanged",)

    def __init__(self, parent=None):
        super().__init__(parent)
        self._states: list[int] = []

    def model(self):
        return _ItemModel(self)

    def addItem(self, text):
        self._states.append(Qt.Checked)
        super().addItem(text)

    def clear(self):
        self._states = []
        super().clear()

    def checkState(self, index):
        return self._states[index.row()]

    def setCheckState(self, index, state):
        if self._states[index.row()] != state:
            self._states[index.row()] = state
            self._emit("checkedIndexesChanged")

    def checkedIndexes(self):
        return [_ModelIndex(i) for i, s in enumerate(self._states) if s == Qt.Checked]

    def allChecked(self):
        return all(s == Qt.Checked for s in self._states)

    def noneChecked(self):
        return not any(s == Qt.Checked for s in self._states)


class QLineEdit(QWidget):
    SIGNALS = ("textChanged",)

    def __init__(self, parent=None):
        super().__init__(parent)
        self._text = ""

    @property
    def text(self):
        return self._text

    @text.setter
    def text(self, value):
        if value != self._text:
            self._text = value
            self._emit("textChanged", value)


class QTextEdit(QLineEdit):
    def toPlainText(self):
        return self.text

    def setPlainText(self, text):
        self.text = text


class QPlainTextEdit(QWidget):
    def __init__(self, parent=None):
        super().__init__(parent)
        self.lines: list[str] = []

    def appendPlainText(self, text):
        self.lines.append(str(text))

    def clear(self):
        self.lines = []

    def toPlainText(self):
        return "\n".join(self.lines)


class QColor:
    def __init__(self, *args):
        self.args = args


class QIcon:
    def __init__(self, *args):
        pass


class QTimer(QObject):
    SIGNALS = ("timeout",)

    def __init__(self, parent=None):
        super().__init__(parent)
        self.interval = 0
        self.active = False

    def setInterval(self, ms):
        self.interval = ms

    def start(self, *args):
        self.active = True

    def stop(self):
        self.active = False

    def isActive(self):
        return self.active


class QFileDialog:
    """Any call fails the test: the module must never open a dialog on its own."""

    calls: list = []
    answers: list = []  # what the user picks in the next folder dialogs a test expects

    @staticmethod
    def getOpenFileName(*args):
        QFileDialog.calls.append(args)
        raise AssertionError("a file dialog was opened without the user asking for one")

    @staticmethod
    def getExistingDirectory(*args):
        QFileDialog.calls.append(args)
        if not QFileDialog.answers:
            raise AssertionError("a folder dialog was opened without the user asking for one")
        return QFileDialog.answers.pop(0)


class QMessageBox(QWidget):
    """A message box that records what it showed and clicks the button a test chose.

    Tests set ``QMessageBox.answers`` (button texts, one per box to come, e.g. ``["Segment anyway"]``);
    a box with no answer left fails the test (the module asked something the test did not expect).
    ``QMessageBox.shown`` collects ``(title, text, [button texts])`` of every box.
    """

    Ok, Cancel, Close = 0x400, 0x400000, 0x200000
    AcceptRole, RejectRole = 0, 1
    Information, Warning, Question = 1, 2, 4
    _STANDARD = {Ok: "OK", Cancel: "Cancel", Close: "Close"}
    answers: list = []
    shown: list = []

    def __init__(self, parent=None):
        super().__init__(parent)
        self._title, self._text, self._buttons, self._clicked, self.default = "", "", [], None, None

    def setWindowTitle(self, title):
        self._title = title

    def setText(self, text):
        self._text = text

    def setIcon(self, icon):
        self.icon = icon

    def addButton(self, button, role=None):
        button = QPushButton(self._STANDARD[button] if isinstance(button, int) else button)
        self._buttons.append(button)
        return button

    def setDefaultButton(self, button):
        self.default = button

    def exec_(self):
        texts = [b.text for b in self._buttons]
        QMessageBox.shown.append((self._title, self._text, texts))
        if not QMessageBox.answers:
            raise AssertionError(f"unexpected message box {self._title!r} with buttons {texts}")
        answer = QMessageBox.answers.pop(0)
        assert answer in texts, f"{answer!r} is not a button of {self._title!r} ({texts})"
        self._clicked = self._buttons[texts.index(answer)]
        return 0

    exec = exec_

    def clickedButton(self):
        return self._clicked


# -- CTK and MRML widgets ------------------------------------------------------------------------


class ctkCollapsibleButton(QAbstractButton):
    pass


class ctkPathLineEdit(QWidget):
    """As CTK's: ``currentPathChanged`` is emitted only for valid input (never for ""), validity changes
    through ``validInputChanged(bool)``."""

    SIGNALS = ("currentPathChanged", "validInputChanged")

    def __init__(self, parent=None):
        super().__init__(parent)
        self._path = ""
        self._valid = False
        self.filters = None

    @property
    def currentPath(self):
        return self._path

    @currentPath.setter
    def currentPath(self, value):
        if value == self._path:
            return
        self._path = value
        valid = bool(value)
        if valid != self._valid:
            self._valid = valid
            self._emit("validInputChanged", valid)
        if valid:
            self._emit("currentPathChanged", value)


class qMRMLWidget(QWidget):
    """Slicer's qMRMLWidget: ``setMRMLScene`` only emits ``mrmlSceneChanged``; a child selector gets the scene
    through a ``<connection>`` of the .ui file (as in Slicer, a selector left out never sees the scene)."""

    def __init__(self, parent=None):
        super().__init__(parent)
        self.sceneReceivers: list[str] = []  # filled by load_ui from the .ui's connections

    def setMRMLScene(self, scene):
        self.mrmlScene = scene
        for child in self.findChildren(qMRMLNodeComboBox):
            if child.objectName in self.sceneReceivers:
                child.setMRMLScene(scene)


class qMRMLNodeComboBox(QWidget):
    SIGNALS = ("currentNodeChanged",)

    def __init__(self, parent=None):
        super().__init__(parent)
        self.nodeTypes = []
        self.mrmlScene = None
        self._node = None

    def setMRMLScene(self, scene):
        self.mrmlScene = scene

    def currentNode(self):
        return self._node

    def setCurrentNode(self, node):
        if node is not None and self.mrmlScene is None:
            return  # as qMRMLNodeComboBox: without a scene it can show no node (it only remembers the ID)
        if node is not None and self.nodeTypes and not any(node.IsA(t) for t in self.nodeTypes):
            raise TypeError(f"{node.GetClassName()} is not one of {self.nodeTypes}")
        if node is not self._node:
            self._node = node
            self._emit("currentNodeChanged", node)


def _plain(name, base=QWidget):
    return type(name, (base,), {})


QT_CLASSES = {c.__name__: c for c in (QObject, QWidget, QLabel, QPushButton, QToolButton, QCheckBox, QSpinBox,
                                      QDoubleSpinBox, QSlider, QProgressBar, QComboBox, QLineEdit, QTextEdit,
                                      QPlainTextEdit, QColor, QIcon, QTimer, QFileDialog, QMessageBox)}
CTK_CLASSES = {"ctkCollapsibleButton": ctkCollapsibleButton, "ctkPathLineEdit": ctkPathLineEdit,
               "ctkCheckableComboBox": ctkCheckableComboBox,
               **{n: _plain(n) for n in ("ctkCheckBox", "ctkCheckablePushButton", "ctkSliderWidget", "ctkDoubleSlider",
                                         "ctkDoubleSpinBox", "ctkComboBox", "ctkRangeWidget", "ctkDoubleRangeSlider",
                                         "ctkDirectoryButton", "ctkColorPickerButton")}}
MRML_CLASSES = {"qMRMLWidget": qMRMLWidget, "qMRMLNodeComboBox": qMRMLNodeComboBox,
                **{n: _plain(n) for n in ("qMRMLSliderWidget", "qMRMLSpinBox", "qMRMLRangeWidget")}}
LAYOUTS = {"QVBoxLayout", "QHBoxLayout", "QGridLayout", "QFormLayout"}


# -- the .ui loader ------------------------------------------------------------------------------


def _value(prop):
    node = next(iter(prop), None)
    if node is None:
        return None
    if node.tag == "string":
        return node.text or ""
    if node.tag in ("number",):
        return int(node.text)
    if node.tag == "double":
        return float(node.text)
    if node.tag == "bool":
        return node.text == "true"
    if node.tag == "stringlist":
        return [s.text or "" for s in node.findall("string")]
    return None


def load_ui(path):
    """Build the widget tree a ``.ui`` file declares from the stand-in classes; returns the top widget."""
    classes = {**QT_CLASSES, **CTK_CLASSES, **MRML_CLASSES}

    def build(element, parent):
        cls_name = element.get("class")
        if cls_name not in classes:
            raise TypeError(f"{path}: widget class {cls_name} has no stand-in; add it to Testing/slicer_standins.py")
        widget = classes[cls_name](parent=parent) if cls_name not in ("QLabel",) else classes[cls_name]("", parent)
        widget.objectName = element.get("name")
        for prop in element.findall("property"):
            name, value = prop.get("name"), _value(prop)
            if prop.get("stdset") == "0":
                widget.setProperty(name, value)
            elif name in ("text", "toolTip", "nodeTypes", "checked", "minimum", "maximum", "decimals", "value",
                          "enabled", "visible", "checkable", "singleStep"):
                setattr(widget, name, value)
        for child in element:
            if child.tag == "widget":
                build(child, widget)
            elif child.tag == "layout":
                if child.get("class") not in LAYOUTS:
                    raise TypeError(f"{path}: layout class {child.get('class')} has no stand-in")
                for item in child.iter("item"):
                    for sub in item.findall("widget"):
                        build(sub, widget)
        return widget

    tree = ET.parse(path).getroot()
    widget = build(tree.find("widget"), None)
    if isinstance(widget, qMRMLWidget):
        widget.sceneReceivers = [c.findtext("receiver") for c in tree.iter("connection")
                                 if c.findtext("sender") == widget.objectName
                                 and c.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)"
                                 and c.findtext("slot") == "setMRMLScene(vtkMRMLScene*)"]
    return widget


def child_widget_variables(widget):
    """``slicer.util.childWidgetVariables``: every named descendant as an attribute."""
    ns = types.SimpleNamespace()
    for child in widget.findChildren(QWidget):
        if child.objectName:
            setattr(ns, child.objectName, child)
    return ns


# -- installing them -----------------------------------------------------------------------------


class _Application:
    """``slicer.app``: what Slicer's Python layer and the module call on it."""

    def __init__(self):
        self.processed = 0
        self.connections = []

    def translate(self, context, text):
        return text

    def processEvents(self):
        self.processed += 1

    def connect(self, signature, slot):
        self.connections.append((signature, slot))

    def moduleManager(self):
        return types.SimpleNamespace(connect=self.connect, disconnect=lambda *a: None)

    def commandOptions(self):
        return types.SimpleNamespace(testingEnabled=True)


def _load_package(name, folder: Path):
    spec = importlib.util.spec_from_file_location(name, folder / "__init__.py", submodule_search_locations=[str(folder)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _load_module(name, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def install(monkeypatch, slicer_python: Path, module_file: Path, errors: list):
    """Put ``qt``, ``ctk`` and the MRML widget classes in place, load Slicer's real ``i18n``,
    ``parameterNodeWrapper`` and ``ScriptedLoadableModule`` from ``slicer_python``, and return
    ``slicer`` (the slicer-core package, patched; every patch is undone by ``monkeypatch``).

    ``errors`` collects what ``slicer.util.errorDisplay`` would have shown.
    """
    import slicer
    import slicer.util

    qt = types.ModuleType("qt")
    for name, cls in QT_CLASSES.items():
        setattr(qt, name, cls)
    for name in LAYOUTS:
        setattr(qt, name, QLayout)
    qt.Qt = Qt
    qt.QSettings = lambda *a: types.SimpleNamespace(value=lambda key, default=None: default, setValue=lambda *a: None)
    ctk = types.ModuleType("ctk")
    for name, cls in CTK_CLASSES.items():
        setattr(ctk, name, cls)
    monkeypatch.setitem(sys.modules, "qt", qt)
    monkeypatch.setitem(sys.modules, "ctk", ctk)
    for name, cls in MRML_CLASSES.items():
        monkeypatch.setattr(slicer, name, cls, raising=False)
    monkeypatch.setattr(slicer, "app", _Application(), raising=False)

    util = slicer.util
    monkeypatch.setattr(util, "loadUI", load_ui)
    monkeypatch.setattr(util, "childWidgetVariables", child_widget_variables)
    monkeypatch.setattr(util, "settingsValue", lambda key, default=None, converter=None: default)
    monkeypatch.setattr(util, "modulePath", lambda name: str(module_file))
    monkeypatch.setattr(util, "errorDisplay", lambda text, *a, **k: errors.append(text))
    monkeypatch.setattr(util, "confirmOkCancelDisplay", lambda *a, **k: True)
    monkeypatch.setattr(util, "setSliceViewerLayers", lambda **k: None)

    for name in [n for n in list(sys.modules) if n.startswith("slicer.parameterNodeWrapper")
                 or n in ("slicer.ScriptedLoadableModule", "slicer.i18n")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "slicer.i18n", None)  # recorded, so it is restored afterwards
    i18n = _load_module("slicer.i18n", slicer_python / "slicer" / "i18n.py")
    monkeypatch.setattr(slicer, "i18n", i18n, raising=False)
    monkeypatch.setitem(sys.modules, "slicer.parameterNodeWrapper", None)
    pnw = _load_package("slicer.parameterNodeWrapper", slicer_python / "slicer" / "parameterNodeWrapper")
    monkeypatch.setattr(slicer, "parameterNodeWrapper", pnw, raising=False)
    monkeypatch.setitem(sys.modules, "slicer.ScriptedLoadableModule", None)
    slm = _load_module("slicer.ScriptedLoadableModule", slicer_python / "slicer" / "ScriptedLoadableModule.py")
    monkeypatch.setattr(slicer, "ScriptedLoadableModule", slm, raising=False)
    return slicer


def load_module_fresh(monkeypatch, module_file: Path, name: str = "ReCoKD"):
    """Import the scripted module file anew (as Slicer does), with the stand-ins in place; its helper
    package too, whose logic picks Slicer's base classes at import time."""
    for loaded in [n for n in list(sys.modules) if n == "ReCoKDSlicer" or n.startswith("ReCoKDSlicer.")]:
        monkeypatch.delitem(sys.modules, loaded)
    monkeypatch.setitem(sys.modules, name, None)
    return _load_module(name, module_file)

