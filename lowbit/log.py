"""One logger for the whole package; the CLI decides where it goes and how loud it is."""
import logging

logger = logging.getLogger("lowbit")
logger.addHandler(logging.NullHandler())
