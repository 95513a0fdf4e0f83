"""The core a camera needs: backends, preprocessing, model cards, frame sources and (later) the gates."""
