// Starts Swagger UI on /docs. A file of its own, not an inline <script>, so the page's CSP can refuse all
// inline script (FastAPI's page has one).

SwaggerUIBundle({
  url: "/openapi.json",
  dom_id: "#swagger-ui",
  layout: "BaseLayout",
  presets: [SwaggerUIBundle.presets.apis],
  deepLinking: true,
  showExtensions: true,
  showCommonExtensions: true,
  // No validity badge fetched from validator.swagger.io, whatever the layout.
  validatorUrl: null,
  // A token given to Authorize stays in this tab's memory: never in storage the chat page shares.
  persistAuthorization: false,
});
