// Light and dark themes: the system's preference until the person picks one with the toggle.

const THEME_KEY = "ogw.theme";
const systemDark = window.matchMedia("(prefers-color-scheme: dark)");

function chosen() {
  return localStorage.getItem(THEME_KEY) || (systemDark.matches ? "dark" : "light");
}

function apply(theme, toggle) {
  document.documentElement.dataset.theme = theme;
  toggle.setAttribute("aria-pressed", String(theme === "dark"));
  toggle.title = theme === "dark" ? "Switch to the light theme" : "Switch to the dark theme";
}

export function setUpTheme(toggle) {
  apply(chosen(), toggle);
  toggle.addEventListener("click", () => {
    const next = chosen() === "dark" ? "light" : "dark";
    localStorage.setItem(THEME_KEY, next);
    apply(next, toggle);
  });
  systemDark.addEventListener("change", () => {
    if (!localStorage.getItem(THEME_KEY)) apply(chosen(), toggle);
  });
}
